//! Qwen2.5-Omni's code2wav (DiT + BigVGAN) and its voices (`spk_dict.pt`)
//! on the tiny random checkpoint, against transformers' references
//! (`tests/fixtures/qwen2_5_omni/make_qwen_omni_fixture.py`).
mod qwen_omni_support;

use omni_engine::qwen2_5_omni::{SampleOptions, Speakers, Token2Wav};
use omni_engine::Device;
use qwen_omni_support::{fixtures, json, max_abs, sidecar, Result};
use serde_json::Value;
use tch::{Kind, Tensor};

#[test]
fn the_voices_are_read_as_shipped() -> Result {
    let refs = json("references.json")?;
    let speakers = Speakers::load(&fixtures().join("tiny/spk_dict.pt"), 24, 80)?;
    assert_eq!(speakers.names(), ["Chelsie", "Ethan"]);
    for name in ["Chelsie", "Ethan"] {
        let s = speakers.get(Some(name))?;
        let r = &refs["speakers"][name];
        assert_eq!(Some(s.bos_token), r["bos_token"].as_i64());
        let cond = sidecar(&r["cond"])?;
        assert!(
            s.cond.reshape([-1]).equal(&cond.reshape([-1])),
            "{name} cond"
        );
        let mel = sidecar(&r["ref_mel"])?;
        assert!(s.ref_mel.squeeze_dim(0).equal(&mel), "{name} ref_mel");
    }
    assert_eq!(speakers.get(None)?.name, "Chelsie");
    let e = speakers
        .get(Some("Nobody"))
        .err()
        .ok_or("an unknown voice")?;
    let msg = e.to_string();
    assert!(
        msg.contains("Nobody") && msg.contains("Chelsie, Ethan"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn seeded_waveforms_equal_transformers() -> Result {
    let refs = json("references.json")?;
    let t2w = Token2Wav::load(&fixtures().join("tiny"), Device::Cpu)?;
    for case in refs["talker"]["cases"].as_array().ok_or("no cases")? {
        for variant in ["hf_generate", "with_codec_prefix"] {
            let v = &case[variant];
            let codes: Vec<i64> = v["codes"]
                .as_array()
                .ok_or("no codes")?
                .iter()
                .filter_map(Value::as_i64)
                .collect();
            let r = &v["token2wav"];
            let seed = r["seed"].as_u64().ok_or("no seed")?;
            let speaker = case["speaker"].as_str();
            let name = format!("{} {variant}", case["name"]);

            // The noise libtorch draws is transformers' noise.
            tch::manual_seed(seed as i64);
            let noise = Tensor::randn(
                [1, codes.len() as i64 * 2, 80],
                (Kind::Float, tch::Device::Cpu),
            );
            assert!(
                noise.squeeze_dim(0).equal(&sidecar(&r["noise"])?),
                "{name}: noise"
            );

            let voice = t2w.speakers().get(speaker)?;
            let mel = t2w.dit().sample(
                &Tensor::from_slice(&codes),
                &voice.cond,
                &voice.ref_mel,
                &noise,
                SampleOptions {
                    num_steps: r["num_steps"].as_u64().ok_or("num_steps")? as usize,
                    guidance_scale: r["guidance_scale"].as_f64().ok_or("guidance")?,
                    sway_coefficient: r["sway_coefficient"].as_f64().ok_or("sway")?,
                },
            )?;
            let mel_ref = sidecar(&r["mel"])?;
            let mel_err = max_abs(&(&mel - &mel_ref)) / max_abs(&mel_ref);
            assert!(mel_err < 1e-3, "{name}: mel off by {mel_err} of its peak");

            let wav = t2w.synthesize(&codes, speaker, seed)?;
            let wav_ref = sidecar(&r["wav"])?;
            assert_eq!(wav.size(), wav_ref.size(), "{name}: sample count");
            let peak = max_abs(&wav_ref);
            let err = max_abs(&(&wav - &wav_ref));
            eprintln!("{name}: mel error {mel_err:.2e} of peak, waveform error {err:.2e} (peak {peak:.3})");
            assert!(
                err <= 0.01 * peak,
                "{name}: waveform off by {err} (peak {peak})"
            );
        }
    }
    Ok(())
}

#[test]
fn bad_inputs_are_named() -> Result {
    let t2w = Token2Wav::load(&fixtures().join("tiny"), Device::Cpu)?;
    let e = t2w
        .synthesize(&[3, 999, 4], None, 0)
        .err()
        .ok_or("code 999")?;
    assert!(e.to_string().contains("999"), "{e}");
    let e = t2w
        .synthesize(&[3], Some("Nobody"), 0)
        .err()
        .ok_or("voice")?;
    assert!(e.to_string().contains("Nobody"), "{e}");

    // A folder that is not Qwen2.5-Omni, and one without its voices.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#)?;
    let e = Token2Wav::load(dir.path(), Device::Cpu)
        .err()
        .ok_or("llama")?;
    assert!(e.to_string().contains("llama"), "{e}");
    for f in std::fs::read_dir(fixtures().join("tiny"))? {
        let f = f?;
        if f.file_name() != "spk_dict.pt" {
            std::fs::copy(f.path(), dir.path().join(f.file_name()))?;
        }
    }
    let e = Token2Wav::load(dir.path(), Device::Cpu)
        .err()
        .ok_or("no spk_dict.pt")?;
    assert!(e.to_string().contains("spk_dict.pt"), "{e}");
    Ok(())
}
