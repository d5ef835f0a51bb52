//! Streaming detokenization: deltas never carry a broken character, and
//! together they equal a full decode.
use omni_engine::{Detokenizer, ModelSource, Tokenizer};

#[path = "fixtures/reference.rs"]
mod reference;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TEXTS: &[&str] = &[
    "héllo 😀 世界 🇫🇷 — naïve café",
    "Emoji run: 🤔🤔🤔👍🏽👨‍👩‍👧 done.",
    "日本語のテキストと English mixed, 中文 too.",
    " leading spaces  and\ttabs\nnewlines",
];

fn stream(
    tok: &Tokenizer,
    prompt: &[u32],
    ids: &[u32],
    skip: bool,
) -> omni_engine::Result<(Vec<String>, String)> {
    let mut d = Detokenizer::new(tok, prompt, skip);
    let mut deltas = Vec::new();
    for &id in ids {
        deltas.push(d.step(tok, id)?);
    }
    let tail = d.flush(tok)?;
    Ok((deltas, tail))
}

fn tokenizers() -> Result<Vec<(String, Tokenizer)>, Box<dyn std::error::Error>> {
    let mut out = vec![(
        "smollm2".to_owned(),
        ModelSource::open("smollm2")?.tokenizer()?,
    )];
    for m in reference::TINY_MODELS {
        let dir = reference::fixtures_dir().join(m);
        out.push((m.to_string(), Tokenizer::from_hf_dir(&dir)?));
    }
    Ok(out)
}

#[test]
fn multibyte_text_streams_without_broken_characters() -> TestResult {
    for (name, tok) in tokenizers()? {
        let prompt = tok.encode("Say something:", false)?;
        for text in TEXTS {
            let ids = tok.encode(text, false)?;
            // The point of the test: some character spans several tokens.
            let (deltas, tail) = stream(&tok, &prompt, &ids, false)?;
            for d in &deltas {
                assert!(
                    !d.contains('\u{fffd}'),
                    "{name}: delta {d:?} of {text:?} splits a character"
                );
            }
            assert_eq!(tail, "", "{name}: nothing held back at the end of {text:?}");
            assert_eq!(deltas.concat(), *text, "{name}: deltas of {text:?}");
        }
    }
    Ok(())
}

#[test]
fn some_character_really_spans_several_tokens() -> TestResult {
    let tok = ModelSource::open("smollm2")?.tokenizer()?;
    let ids = tok.encode("😀", false)?;
    assert!(ids.len() > 1, "😀 is {ids:?}");
    let (deltas, _) = stream(&tok, &[], &ids, false)?;
    assert!(
        deltas[..ids.len() - 1].iter().all(String::is_empty),
        "{deltas:?}"
    );
    assert_eq!(deltas[ids.len() - 1], "😀");
    Ok(())
}

/// Greedy outputs of the reference models, random tiny ones included (they
/// emit stray byte tokens): deltas plus flush equal the text transformers'
/// tokenizer decoded them to (the fixture's, not our own `decode`).
#[test]
fn reference_generations_stream_to_their_full_decode() -> TestResult {
    let mut files = vec![reference::SMOLLM2_REFERENCE.to_owned()];
    files.extend(reference::TINY_MODELS.iter().map(|m| format!("{m}.json")));
    for file in files {
        let r = reference::Reference::load(&file)?;
        let tok = ModelSource::open(r.model_path().to_str().ok_or("path")?)?.tokenizer()?;
        for c in &r.cases {
            for skip in [false, true] {
                let (deltas, tail) = stream(&tok, &c.prompt_token_ids, &c.greedy_token_ids, skip)?;
                let want = if skip {
                    &c.greedy_text_skip_special
                } else {
                    &c.greedy_text
                };
                assert_eq!(
                    &(deltas.concat() + &tail),
                    want,
                    "{} {} skip={skip}",
                    r.model,
                    c.name
                );
            }
        }
    }
    Ok(())
}
