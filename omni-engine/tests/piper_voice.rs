//! Piper's `en_US-joe-medium` voice (installed by `scripts/setup`) against
//! Piper's own tools, on the references that
//! `tests/fixtures/piper/make_piper_fixtures.py` made: phoneme ids from
//! `piper-phonemize`, waveforms from onnxruntime on the same `.onnx`.
use std::path::{Path, PathBuf};

use omni_engine::{Device, PiperVoice, VitsScales};
use serde_json::Value;
use tch::{Kind, Tensor};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/piper")
}

fn json(name: &str) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join(name),
    )?)?)
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

fn voice() -> Result<PiperVoice> {
    Ok(PiperVoice::load("piper-joe", Device::Cpu)?)
}

/// Samples of a reference, from its int16 file scaled by its peak.
fn reference_samples(case: &Value) -> Result<Vec<f32>> {
    let name = case["samples"].as_str().ok_or("no samples file")?;
    let bytes = std::fs::read(fixtures().join(name))?;
    let peak = case["peak"].as_f64().ok_or("no peak")? as f32;
    Ok(bytes
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32767.0 * peak)
        .collect())
}

#[test]
fn phoneme_ids_equal_piper_phonemize() -> Result {
    let voice = voice()?;
    let fixture = json("phonemes.json")?;
    let cases = fixture["cases"].as_array().ok_or("no cases")?;
    assert_eq!(cases.len(), 10);
    for case in cases {
        let text = case["text"].as_str().ok_or("no text")?;
        let ours = voice.phonemize(text)?;
        let theirs = case["sentences"].as_array().ok_or("no sentences")?;
        let ours_ph: Vec<&str> = ours.iter().map(|s| s.phonemes.as_str()).collect();
        let theirs_ph: Vec<&str> = theirs
            .iter()
            .filter_map(|s| s["phonemes"].as_str())
            .collect();
        assert_eq!(ours_ph, theirs_ph, "phonemes of {text:?}");
        for (o, t) in ours.iter().zip(theirs) {
            assert_eq!(o.ids, ids(&t["ids"]), "ids of {text:?}");
            assert!(o.missing.is_empty(), "{text:?}: unmapped {:?}", o.missing);
        }
    }
    Ok(())
}

#[test]
fn deterministic_waveforms_equal_onnxruntime() -> Result {
    let voice = voice()?;
    let fixture = json("waveforms.json")?;
    assert_eq!(
        fixture["sample_rate"].as_u64(),
        Some(u64::from(voice.sample_rate()))
    );
    let cases = fixture["cases"].as_array().ok_or("no cases")?;
    assert_eq!(cases.len(), 3);
    for case in cases {
        let scales: Vec<f64> = case["scales"]
            .as_array()
            .ok_or("no scales")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let scales = VitsScales {
            noise_scale: scales[0],
            length_scale: scales[1],
            noise_w: scales[2],
        };
        let mut noise = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
        let wav = voice.vits().infer(&ids(&case["ids"]), scales, &mut noise)?;
        let ours: Vec<f32> = Vec::try_from(&wav)?;
        let theirs = reference_samples(case)?;
        assert_eq!(
            ours.len(),
            theirs.len(),
            "sample count of {}",
            case["phonemes"]
        );
        let peak = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{}: {} samples, max |ours - onnxruntime| = {worst:.2e} (peak {peak:.3})",
            case["phonemes"],
            ours.len()
        );
        assert!(
            worst <= 1e-3 * peak,
            "{}: max |ours - onnxruntime| = {worst} > 1e-3 of the peak {peak}",
            case["phonemes"]
        );
    }
    Ok(())
}

#[test]
fn seeded_noise_gives_the_same_waveform_and_another_seed_another() -> Result {
    let voice = voice()?;
    let sentences = voice.phonemize("A seeded voice speaks the same way twice.")?;
    let scales = VitsScales {
        noise_scale: 0.667,
        length_scale: 1.0,
        noise_w: 0.8,
    };
    let a = voice.synthesize(&sentences, scales, 7)?;
    let b = voice.synthesize(&sentences, scales, 7)?;
    let c = voice.synthesize(&sentences, scales, 8)?;
    assert!(a.size()[0] > 0);
    assert!(a.equal(&b), "seed 7 twice differs");
    assert!(
        !(a.size() == c.size() && a.equal(&c)),
        "seeds 7 and 8 agree"
    );
    Ok(())
}

#[test]
fn sentences_are_spoken_in_turn_with_silence_between() -> Result {
    let voice = voice()?;
    let two = voice.phonemize("Hello there. How are you?")?;
    assert_eq!(two.len(), 2);
    let quiet = VitsScales {
        noise_scale: 0.0,
        length_scale: 1.0,
        noise_w: 0.0,
    };
    let whole = voice.synthesize(&two, quiet, 0)?;
    let first = voice.synthesize(&two[..1], quiet, 0)?;
    let second = voice.synthesize(&two[1..], quiet, 0)?;
    let gap = (0.2 * f64::from(voice.sample_rate())).round() as i64;
    let (n1, n2) = (first.size()[0], second.size()[0]);
    assert_eq!(whole.size()[0], n1 + gap + n2);
    assert!(whole.narrow(0, 0, n1).equal(&first));
    assert!(whole.narrow(0, n1 + gap, n2).equal(&second));
    assert_eq!(whole.narrow(0, n1, gap).abs().max().double_value(&[]), 0.0);
    Ok(())
}
