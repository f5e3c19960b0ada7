//! Times as operators read them: the state stores unix seconds; tables show local time
//! (`2026-11-30 07:31:05`), JSON shows RFC 3339 in UTC (`2026-11-30T07:31:05Z`).
//!
//! Owns only formatting; it reads the time zone through the C library (`localtime_r`,
//! which honours `TZ` and /etc/localtime) and never changes it.

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds `secs` (UTC; a pure function).
pub fn rfc3339_utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `YYYY-MM-DD HH:MM:SS` in the local time zone; UTC (with a `Z`) if it cannot be had.
pub fn local(secs: u64) -> String {
    let Ok(t) = libc::time_t::try_from(secs) else { return rfc3339_utc(secs) };
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers are valid for
    // the call, and localtime_r (unlike localtime) uses no shared static buffer.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return rfc3339_utc(secs);
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm, restated).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_009_535), "2026-11-30T03:32:15Z");
    }

    #[test]
    fn local_time_has_the_table_shape() {
        let t = local(1_796_009_535);
        assert_eq!(t.len(), 19, "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
    }
}
