//! stub
pub fn open_connections(_pid: u32) -> Result<usize, String> { Ok(0) }
