//! Default-model files: aliases resolve into the model directory, and a
//! missing, short or corrupt file is refused with a pointer to `scripts/setup`.
use std::path::Path;

use omni_engine::{Error, KnownModelFile};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

fn known(file_name: &'static str, size: u64, sha256: &'static str) -> KnownModelFile {
    KnownModelFile {
        aliases: &[],
        file_name,
        size,
        sha256,
    }
}

fn model_file_reason(r: omni_engine::Result<()>, file: &Path) -> String {
    match r {
        Err(e @ Error::ModelFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("scripts/setup"), "{msg}");
            assert!(msg.contains(&file.display().to_string()), "{msg}");
            msg
        }
        other => panic!("expected ModelFile, got {other:?}"),
    }
}

#[test]
fn aliases_resolve_to_verified_files() -> TestResult {
    let dir = omni_engine::model_dir();
    assert_eq!(
        omni_engine::resolve_model_path("smollm2")?,
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(
        omni_engine::resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")?,
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(
        omni_engine::resolve_model_path("hifigan")?,
        dir.join("hfgan-fcm_base2-L-16k-v0.1.1.ts")
    );
    Ok(())
}

#[test]
fn missing_short_and_corrupt_files_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("m.gguf");
    let k = known("m.gguf", 5, HELLO_SHA256);
    let msg = model_file_reason(omni_engine::verify_model_file(&f, &k), &f);
    assert!(msg.contains("cannot read"), "{msg}");

    std::fs::write(&f, "hell")?;
    let msg = model_file_reason(omni_engine::verify_model_file(&f, &k), &f);
    assert!(msg.contains("size 4"), "{msg}");

    std::fs::write(&f, "jello")?;
    let msg = model_file_reason(omni_engine::verify_model_file(&f, &k), &f);
    assert!(msg.contains("sha256"), "{msg}");

    std::fs::write(&f, "hello")?;
    omni_engine::verify_model_file(&f, &k)?;
    Ok(())
}

#[test]
fn a_stamp_is_trusted_only_with_the_files_mtime() -> TestResult {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("m.ts");
    let stamp = dir.path().join("m.ts.sha256");
    // Content that does not match, vouched for by a stamp: trusted as long as
    // the stamp has the file's mtime (what scripts/setup writes).
    std::fs::write(&f, "jello")?;
    std::fs::write(&stamp, format!("{HELLO_SHA256}\n"))?;
    let mtime = std::fs::metadata(&f)?.modified()?;
    std::fs::File::options()
        .write(true)
        .open(&stamp)?
        .set_modified(mtime)?;
    let k = known("m.ts", 5, HELLO_SHA256);
    omni_engine::verify_model_file(&f, &k)?;
    // Touch the file: the stamp no longer vouches, the hash is checked.
    let later = mtime + std::time::Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&f)?
        .set_modified(later)?;
    model_file_reason(omni_engine::verify_model_file(&f, &k), &f);
    Ok(())
}

#[test]
fn the_real_default_files_hash_to_their_digests() -> TestResult {
    // Hash for real (no stamp), once, to prove the digests we ship are right.
    for k in omni_engine::KNOWN_MODEL_FILES {
        let path = omni_engine::model_dir().join(k.file_name);
        assert_eq!(
            omni_engine::sha256_file(&path)?,
            k.sha256,
            "{}",
            path.display()
        );
        assert_eq!(std::fs::metadata(&path)?.len(), k.size);
    }
    Ok(())
}
