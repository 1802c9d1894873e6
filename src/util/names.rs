//! Names of option enums on the command line and in configs are their serde names, so a value
//! reads the same in `--weights q8`, a config file and results.json. Library enums implement
//! `FromStr`/`Display` through these two functions instead of depending on a CLI crate.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parses `s` as the serde name of one of `T`'s unit variants; the error lists `choices`.
pub fn parse_named<T: DeserializeOwned>(s: &str, what: &str, choices: &[&str]) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown {what} {s:?}; choose one of: {}", choices.join(", ")))
}

/// The serde name of a unit variant.
pub fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

/// `FromStr` and `Display` for a unit-variant enum through its serde names.
#[macro_export]
macro_rules! named_enum {
    ($t:ty, $what:expr, [$($choice:expr),+ $(,)?]) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $crate::util::names::parse_named(s, $what, &[$($choice),+])
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::util::names::serde_name(self))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Exact,
    }
    crate::named_enum!(Mode, "mode", ["fast", "exact"]);

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        assert_eq!("exact".parse::<Mode>().unwrap(), Mode::Exact);
        assert_eq!(Mode::Fast.to_string(), "fast");
        let e = "quick".parse::<Mode>().unwrap_err();
        assert!(e.contains("quick") && e.contains("fast, exact"), "{e}");
    }
}
