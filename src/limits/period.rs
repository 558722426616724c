//! Budget periods on the UTC calendar, without a date-time dependency: a day is 86,400 s
//! and a month starts on the 1st (civil-date arithmetic after Howard Hinnant's algorithms).

use std::time::{SystemTime, UNIX_EPOCH};

const DAY_MS: i64 = 86_400_000;

/// How often a key's token budget starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
    /// Never: a lifetime allowance.
    Total,
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<BudgetPeriod> {
        match text {
            "day" | "daily" => Some(BudgetPeriod::Day),
            "month" | "monthly" => Some(BudgetPeriod::Month),
            "total" | "lifetime" => Some(BudgetPeriod::Total),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }

    /// The start and end (Unix ms) of the period holding `now_ms`.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        match self {
            BudgetPeriod::Day => {
                let start = now_ms.div_euclid(DAY_MS) * DAY_MS;
                (start, start + DAY_MS)
            }
            BudgetPeriod::Month => {
                let (y, m, _) = civil_from_days(now_ms.div_euclid(DAY_MS));
                let start = days_from_civil(y, m, 1) * DAY_MS;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start, days_from_civil(ny, nm, 1) * DAY_MS)
            }
            BudgetPeriod::Total => (0, i64::MAX),
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` for a day number since the Unix epoch.
pub fn format_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses `YYYY-MM-DD` into a day number since the Unix epoch.
pub fn parse_day(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || text.len() != 10 {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(format_day(0), "1970-01-01");
        assert_eq!(format_day(20_415), "2025-11-23");
        assert_eq!(parse_day("2025-11-23"), Some(20_415));
        assert_eq!(
            parse_day("2024-02-29").map(format_day).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(parse_day("2024-13-01"), None);
        for day in -1000..30_000 {
            assert_eq!(parse_day(&format_day(day)), Some(day));
        }
    }

    #[test]
    fn month_bounds() {
        let mid_feb_2024 = parse_day("2024-02-15").unwrap_or(0) * DAY_MS + 5_000;
        let (start, end) = BudgetPeriod::Month.bounds(mid_feb_2024);
        assert_eq!(format_day(start / DAY_MS), "2024-02-01");
        assert_eq!(format_day(end / DAY_MS), "2024-03-01");
        let dec = parse_day("2023-12-31").unwrap_or(0) * DAY_MS;
        let (_, end) = BudgetPeriod::Month.bounds(dec);
        assert_eq!(format_day(end / DAY_MS), "2024-01-01");
        let (start, end) = BudgetPeriod::Day.bounds(dec + 3_600_000);
        assert_eq!((start, end), (dec, dec + DAY_MS));
    }
}
