//! Chat templates: the Jinja program a model ships to turn messages into
//! its prompt format, rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it with Jinja2.
//!
//! transformers' environment (`utils/chat_template_utils.py`) is
//! reproduced: `trim_blocks` and `lstrip_blocks` on, loop controls, Python
//! string methods on values (`minijinja-contrib`'s pycompat), a `tojson`
//! filter that prints like Python's `json.dumps(ensure_ascii=False)` (not
//! minijinja's HTML-safe one), `raise_exception(msg)`, `strftime_now(fmt)`
//! (UTC; Llama 3.x templates print today's date), and the special
//! tokens (`bos_token`, `eos_token`, ...) as variables.
use std::collections::BTreeMap;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

const NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| Error::Tokenizer(format!("chat template does not compile: {e:#}")))?;
        Ok(Self {
            env,
            source: source.to_owned(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (anything serializable to a list of
    /// `{role, content, ...}` maps). `special_tokens` become template
    /// variables (`bos_token`, `eos_token`, ...).
    pub fn render<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))?;
        let mut ctx: BTreeMap<String, Value> = special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        tmpl.render(ctx)
            .map_err(|e| Error::Tokenizer(format!("chat template failed to render: {e:#}")))
    }
}

/// `raise_exception(msg)`: the template rejects its input.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time formatted like Python's
/// `datetime.now().strftime(fmt)` for the directives chat templates use
/// (`%d %b %B %Y %m %H %M %S %%`); others are kept verbatim.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(secs, &fmt)
}

fn strftime(unix_secs: u64, fmt: &str) -> String {
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
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's days -> civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `x | tojson(indent=None)` as Python's
/// `json.dumps(x, ensure_ascii=False, indent=indent)` prints it: `", "` and
/// `": "` separators, non-ASCII kept, keys in insertion order.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let (true, Some(i)) = (v.is_integer(), v.as_i64()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                let s = if f.is_nan() {
                    "NaN".to_owned()
                } else if f.is_infinite() {
                    if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
                } else {
                    // Rust's `{:?}` of a float keeps the `.0`, as Python's repr does.
                    format!("{f:?}")
                };
                out.push_str(&s);
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(item, indent, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                match key.as_str() {
                    Some(s) => write_json_str(s, out),
                    None => write_json_str(&key.to_string(), out),
                }
                out.push_str(": ");
                write_json(&v.get_item(key)?, indent, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => write_json_str(&v.to_string(), out),
    }
    Ok(())
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Msg {
        role: &'static str,
        content: &'static str,
    }

    #[test]
    fn tojson_prints_like_python() -> Result<()> {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.add_template("t", "{{ x | tojson }}|{{ y | tojson(indent=2) }}")
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ctx = minijinja::context! {
            x => minijinja::context! { b => "é<&>\n", a => vec![1.5, 2.0], c => () },
            y => vec![1, 2],
        };
        let s = env
            .get_template("t")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // Keys in insertion order, as Python dicts keep them.
        assert_eq!(
            s,
            "{\"b\": \"é<&>\\n\", \"a\": [1.5, 2.0], \"c\": null}|[\n  1,\n  2\n]"
        );
        Ok(())
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-02-29 13:05:09 UTC.
        assert_eq!(strftime(1_709_211_909, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            strftime(1_709_211_909, "%B %m %H:%M:%S %%"),
            "February 02 13:05:09 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d"), "1970-01-01");
        assert!(!strftime_now("%Y".into()).is_empty());
    }

    #[test]
    fn raise_exception_is_an_error() -> Result<()> {
        let t = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}")?;
        let msgs = [Msg {
            role: "user",
            content: "hi",
        }];
        let err = t
            .render(&msgs, true, &BTreeMap::new())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("only user and assistant roles")));
        Ok(())
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() -> Result<()> {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src)?;
        let msgs = [Msg {
            role: "user",
            content: " hi ",
        }];
        assert_eq!(t.render(&msgs, false, &BTreeMap::new())?, "[hi]\n");
        Ok(())
    }
}
