//! Tokenization, decoding and chat templates against transformers' output
//! (`fixtures/*.json`), for the default GGUF (tokenizer built from GGUF
//! metadata) and the tiny HF folders (`tokenizer.json`).
use omni_engine::{ModelSource, Tokenizer};

#[path = "fixtures/reference.rs"]
mod reference;
use reference::Reference;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn all_references() -> Result<Vec<(Reference, Tokenizer)>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    let names = std::iter::once(reference::SMOLLM2_REFERENCE.to_owned())
        .chain(reference::TINY_MODELS.iter().map(|m| format!("{m}.json")));
    for file in names {
        let r = Reference::load(&file)?;
        let path = r.model_path();
        let tok = ModelSource::open(path.to_str().ok_or("path")?)?.tokenizer()?;
        out.push((r, tok));
    }
    Ok(out)
}

#[test]
fn encode_and_decode_match_transformers() -> TestResult {
    for (r, tok) in all_references()? {
        for c in &r.tokenizer_cases {
            let ids = tok.encode(&c.text, c.add_special_tokens)?;
            assert_eq!(
                ids, c.ids,
                "{}: encode({:?}, {})",
                r.model, c.text, c.add_special_tokens
            );
            assert_eq!(
                tok.decode(&ids, false)?,
                c.decoded,
                "{}: decode {:?}",
                r.model,
                c.text
            );
            assert_eq!(
                tok.decode(&ids, true)?,
                c.decoded_skip_special,
                "{}: decode skip {:?}",
                r.model,
                c.text
            );
        }
        for c in &r.cases {
            let special = c.group != "chat";
            assert_eq!(
                tok.encode(&c.prompt, special)?,
                c.prompt_token_ids,
                "{} {}: prompt ids",
                r.model,
                c.name
            );
            assert_eq!(
                tok.decode(&c.greedy_token_ids, false)?,
                c.greedy_text,
                "{} {}",
                r.model,
                c.name
            );
            assert_eq!(
                tok.decode(&c.greedy_token_ids, true)?,
                c.greedy_text_skip_special,
                "{} {}",
                r.model,
                c.name
            );
        }
    }
    Ok(())
}

#[test]
fn chat_templates_render_as_transformers() -> TestResult {
    for (r, tok) in all_references()? {
        assert!(
            tok.chat_template().is_some(),
            "{} has a chat template",
            r.model
        );
        for c in &r.chat_template_cases {
            let text = tok.apply_chat_template(&c.messages, c.add_generation_prompt)?;
            assert_eq!(text, c.rendered, "{}: {:?}", r.model, c.messages);
            assert_eq!(
                tok.encode(&text, false)?,
                c.ids,
                "{}: ids of {:?}",
                r.model,
                c.messages
            );
        }
        for c in r.cases.iter().filter(|c| c.group == "chat") {
            let messages = c.messages.as_ref().ok_or("chat case without messages")?;
            let text = tok.apply_chat_template(messages, true)?;
            assert_eq!(
                tok.encode(&text, false)?,
                c.prompt_token_ids,
                "{} {}",
                r.model,
                c.name
            );
        }
    }
    Ok(())
}

#[test]
fn special_tokens_and_eos() -> TestResult {
    for (r, tok) in all_references()? {
        assert_eq!(tok.bos_token_id(), r.bos_token_id, "{}", r.model);
        for eos in &r.eos_token_ids {
            assert!(tok.eos_token_ids().contains(eos), "{}: eos {eos}", r.model);
            assert!(tok.is_special(*eos), "{}: eos {eos} is special", r.model);
        }
    }
    let smol = ModelSource::open("smollm2")?.tokenizer()?;
    assert_eq!(smol.vocab_size(), 49152);
    assert_eq!(smol.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(smol.id_to_token(1).as_deref(), Some("<|im_start|>"));
    Ok(())
}

#[test]
fn out_of_vocabulary_ids_are_named() -> TestResult {
    let tok = ModelSource::open("smollm2")?.tokenizer()?;
    let err = tok
        .decode(&[1, 49152], false)
        .err()
        .ok_or("decoded an unknown id")?;
    assert!(err.to_string().contains("49152"), "{err}");
    Ok(())
}

#[test]
fn a_model_without_a_template_says_so() -> TestResult {
    let dir = tempfile::tempdir()?;
    let src = reference::fixtures_dir().join("tiny-qwen2");
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )?;
    let tok = Tokenizer::from_hf_dir(dir.path())?;
    let msgs = [reference::Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    let err = tok
        .apply_chat_template(&msgs, true)
        .err()
        .ok_or("rendered without a template")?;
    assert!(err.to_string().contains("no chat template"), "{err}");
    Ok(())
}
