pub fn colour_enabled() -> bool { false }
