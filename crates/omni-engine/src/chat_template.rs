//! Chat templates: the Jinja program a model ships to turn messages into
//! its prompt format, rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it with Jinja2.
//!
//! transformers' environment (`utils/chat_template_utils.py`) is
//! reproduced: `trim_blocks` and `lstrip_blocks` on, loop controls, Python
//! string methods on values (`minijinja-contrib`'s pycompat), a `tojson`
//! filter that prints like Python's `json.dumps(ensure_ascii=False)` (not
//! minijinja's HTML-safe one), `raise_exception(msg)`, and the special
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
