//! Chat templates, rendered like `transformers`' `apply_chat_template`.
//!
//! `transformers` compiles a template in a Jinja2 sandbox with `trim_blocks`, `lstrip_blocks` and
//! loop controls, overrides `tojson` (no HTML escaping, `json.dumps` spacing), adds the globals
//! `raise_exception` and `strftime_now`, and passes the special tokens (`bos_token`, `eos_token`, ...),
//! `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and any extra keyword. We do the
//! same with minijinja; Python string methods (`.strip()`, `.startswith()`, ...) come from
//! minijinja-contrib's pycompat. We always pass `enable_thinking=False`: Qwen3's thinking mode is off
//! everywhere in this project, so its template emits the empty `<think>\n\n</think>\n\n` block.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::{Result, TokenizerError};

/// One turn of a conversation, as `{"role": ..., "content": ...}` in `transformers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template. A template that does not compile is kept as its error, so that a
/// model whose template minijinja cannot parse still loads and fails only when a chat prompt is asked.
pub(crate) struct ChatTemplate {
    compiled: std::result::Result<Environment<'static>, String>,
}

impl ChatTemplate {
    pub(crate) fn new(source: String) -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let compiled = match env.add_template_owned(TEMPLATE_NAME, source) {
            Ok(()) => Ok(env),
            Err(e) => Err(describe(&e)),
        };
        ChatTemplate { compiled }
    }

    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<&'static str, String>,
    ) -> Result<String> {
        let env = self
            .compiled
            .as_ref()
            .map_err(|m| TokenizerError::Template { message: m.clone() })?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template {
                message: describe(&e),
            })?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (k, v) in special_tokens {
            ctx.insert(k, Value::from(v.as_str()));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("enable_thinking", Value::from(false));
        template.render(ctx).map_err(|e| TokenizerError::Template {
            message: describe(&e),
        })
    }
}

/// The error with minijinja's source excerpt, which points at the failing template line.
fn describe(e: &Error) -> String {
    format!("{e:#}")
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised: {message}"),
    ))
}

/// Python's `datetime.now().strftime(format)`, in UTC (std has no time zone database).
fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("system clock before 1970: {e}"),
            )
        })?
        .as_secs() as i64;
    strftime(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Proleptic Gregorian (year, month 1..=12, day 1..=31) of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn strftime(unix_secs: i64, format: &str) -> std::result::Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let day_of_year = days - civil_days(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().unwrap_or('%');
        let month_name = MONTHS[(month - 1) as usize];
        match spec {
            'Y' => out += &year.to_string(),
            'y' => out += &format!("{:02}", year.rem_euclid(100)),
            'm' => out += &format!("{month:02}"),
            'd' => out += &format!("{day:02}"),
            'e' => out += &format!("{day:>2}"),
            'j' => out += &format!("{day_of_year:03}"),
            'H' => out += &format!("{hour:02}"),
            'I' => out += &format!("{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'p' => out += if hour < 12 { "AM" } else { "PM" },
            'M' => out += &format!("{minute:02}"),
            'S' => out += &format!("{second:02}"),
            'B' => out += month_name,
            'b' | 'h' => out += &month_name[..3],
            'A' => out += WEEKDAYS[weekday],
            'a' => out += &WEEKDAYS[weekday][..3],
            'F' => out += &format!("{year}-{month:02}-{day:02}"),
            'T' => out += &format!("{hour:02}:{minute:02}:{second:02}"),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: format directive %{other} is not supported"),
                ))
            }
        }
    }
    Ok(out)
}

fn civil_days(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `transformers`' tojson: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`; Python's default separators are `", "` and `": "` (`","` with an indent).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item(&Value::from(0))?;
            let b = s.get_item(&Value::from(1))?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => (
            (if indent.is_some() { "," } else { ", " }).to_string(),
            ": ".to_string(),
        ),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(unit) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Some(i) = v.as_i64() {
                    out.push_str(&i.to_string());
                } else if let Ok(f) = f64::try_from(v.clone()) {
                    out.push_str(&python_float_repr(f));
                } else {
                    out.push_str(&v.to_string());
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => {
                            let mut key = String::new();
                            self.write(k, depth + 1, &mut key)?;
                            self.string(&key, out)
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} value is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.5e-7", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source.to_string()).render(messages, true, &BTreeMap::new())
    }

    #[test]
    fn strftime_matches_python_for_a_known_instant() {
        // python: datetime(2024, 2, 29, 13, 5, 9).strftime("%d %b %Y %A %j %I%p %H:%M:%S %B %y")
        //   -> '29 Feb 2024 Thursday 060 01PM 13:05:09 February 24'
        let t = 1_709_211_909; // 2024-02-29T13:05:09Z
        assert_eq!(
            strftime(t, "%d %b %Y %A %j %I%p %H:%M:%S %B %y").unwrap(),
            "29 Feb 2024 Thursday 060 01PM 13:05:09 February 24"
        );
        assert_eq!(strftime(0, "%F %T %a").unwrap(), "1970-01-01 00:00:00 Thu");
        assert!(strftime(0, "%Q").is_err());
    }

    #[test]
    fn tojson_spaces_and_escapes_like_python_json_dumps() {
        // python: json.dumps({"b": [1, 2.5, None, True], "a": "é\"<>\n", "c": {}, "d": 1e-05},
        //                    ensure_ascii=False) -> '{"b": [1, 2.5, null, true], "a": "é\\"<>\\n", "c": {}, "d": 1e-05}'
        let out = render(
            r#"{{ {"b": [1, 2.5, none, true], "a": "é\"<>\n", "c": {}, "d": 0.00001} | tojson }}"#,
            &[],
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"b": [1, 2.5, null, true], "a": "é\"<>\n", "c": {}, "d": 1e-05}"#
        );
        // python: json.dumps({"b": [1], "a": 2}, indent=2, sort_keys=True) -> '{\n  "a": 2,\n  "b": [\n    1\n  ]\n}'
        let out = render(
            r#"{{ {"b": [1], "a": 2} | tojson(indent=2, sort_keys=true) }}"#,
            &[],
        )
        .unwrap();
        assert_eq!(out, "{\n  \"a\": 2,\n  \"b\": [\n    1\n  ]\n}");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123.0), "123.0");
        assert_eq!(python_float_repr(0.0001), "0.0001");
    }

    #[test]
    fn raise_exception_surfaces_the_template_message() {
        let err = render(
            "{{ raise_exception('only user and assistant roles') }}",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("only user and assistant roles"),
            "{err}"
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls_work_in_templates() {
        let msgs = [ChatMessage::user("  <tool_response>x</tool_response>\n")];
        let out = render(
            "{% for m in messages %}{% if m.content.strip().startswith('<tool_response>') %}yes{% endif %}|{{ m['content'].rstrip('\\n').split('>')[-2] }}{% break %}{% endfor %}",
            &msgs,
        )
        .unwrap();
        assert_eq!(out, "yes|x</tool_response");
    }

    #[test]
    fn a_template_that_does_not_compile_fails_only_when_rendered() {
        let template = ChatTemplate::new("{% for m in messages %}".to_string());
        let err = template.render(&[], true, &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, TokenizerError::Template { .. }), "{err}");
    }
}
