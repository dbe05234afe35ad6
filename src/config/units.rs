//! Human-friendly units used by the config file: durations (`"30s"`) and byte sizes
//! (`65536` or `"64KiB"`).

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A duration written as a string such as `"500ms"`, `"30s"`, `"5m"` (parsed by humantime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// The longest duration any setting takes. Timers add durations to the clock and the JWT
/// check subtracts the leeway from it; a bound far above any sensible setting keeps every
/// such sum in range (a leeway of about 56 years would wrap the JWT check's arithmetic).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            de::Error::custom(format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"5m\""))
        })?;
        if d > MAX_DURATION {
            return Err(de::Error::custom(format!("duration {s:?} is too long (at most 10 years)")));
        }
        Ok(Dur(d))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A byte size: an integer of bytes, or a string with a unit (`B`, `KiB`, `MiB`, `GiB`,
/// and the decimal `KB`, `MB`, `GB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Parses `"64KiB"`, `"1 MiB"`, `"100"`, `"2GB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}; write e.g. 65536, \"64KiB\", \"1MiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("invalid size unit in {s:?}; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: an integer of bytes or a string such as \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b % (1 << 30) == 0 {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b % (1 << 10) == 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("2kb").unwrap(), 2000);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
