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

/// The waveform of `codes` made chunk by chunk, the codes given `per_push`
/// at a time (all at once: `usize::MAX`).
fn chunked(t2w: &Token2Wav, codes: &[i64], per_push: usize, seed: u64) -> Result<(Tensor, usize)> {
    let mut s = t2w.start_stream(Some("Ethan"), seed)?;
    let mut pieces = Vec::new();
    let mut sent = 0;
    while !s.is_finished() {
        if sent < codes.len() && !t2w.piece_ready(&s) {
            let n = per_push.min(codes.len() - sent);
            t2w.push_codes(&mut s, &codes[sent..sent + n], sent + n == codes.len())?;
            sent += n;
            continue;
        }
        if let Some(p) = t2w.next_piece(&mut s)? {
            pieces.push(p);
        }
    }
    let n = pieces.iter().filter(|p| p.numel() > 0).count();
    Ok((Tensor::cat(&pieces, 0), n))
}

/// Chunked code2wav (codes arriving as the talker makes them) gives the
/// same samples however the codes arrive (up to float rounding), as many samples as the whole
/// sequence, within a stated distance of it: its DiT sees each chunk with
/// two blocks of left context and one of look-ahead, not the whole.
#[test]
fn chunked_waveforms_match_the_whole_within_tolerance() -> Result {
    let t2w = Token2Wav::load(&fixtures().join("tiny"), Device::Cpu)?;
    let plan = t2w.chunk_plan();
    assert_eq!((plan.chunk, plan.past, plan.future), (16, 16, 8));
    // A longer answer than the fixture's: 120 codes, 240 frames, 15 chunks.
    // Codes below the talker's special ids (64..): a codec end would stop them.
    let codes: Vec<i64> = (0..120).map(|i| (i * 37 + 11) % 64).collect();
    let whole = t2w.synthesize(&codes, Some("Ethan"), 7)?;
    let (at_once, _) = chunked(&t2w, &codes, usize::MAX, 7)?;
    let (trickled, pieces) = chunked(&t2w, &codes, 3, 7)?;
    assert!(pieces >= 10, "{pieces} pieces");
    assert_eq!(at_once.size(), whole.size(), "sample count");
    // Codes given at once run up to 8 chunks per DiT batch; trickled, one:
    // the same samples up to the rounding of the batched products.
    let drift = max_abs(&(&at_once - &trickled));
    assert!(drift < 1e-5, "pieces depend on when codes came: {drift}");
    let peak = max_abs(&whole);
    let err = max_abs(&(&at_once - &whole));
    let rms = |t: &Tensor| t.square().mean(Kind::Float).sqrt().double_value(&[]);
    let snr = 20.0 * (rms(&whole) / rms(&(&at_once - &whole))).log10();
    eprintln!(
        "chunked vs whole: {pieces} pieces, max error {err:.3e} (peak {peak:.3}), SNR {snr:.1} dB"
    );
    // Measured here: 1.3e-4 of a 0.365 peak, 72 dB.
    assert!(
        err <= 0.005 * peak && snr > 40.0,
        "chunked waveform off by {err:.3e} (peak {peak:.3}), SNR {snr:.1} dB against the whole"
    );
    // Streams batched together (one DiT batch per window length, two
    // voices) give their pieces alone, up to the rounding of larger
    // products.
    let other: Vec<i64> = (0..90).map(|i| (i * 13 + 5) % 64).collect();
    let mut a = t2w.start_stream(Some("Ethan"), 7)?;
    let mut b = t2w.start_stream(Some("Chelsie"), 9)?;
    t2w.push_codes(&mut a, &codes, true)?;
    t2w.push_codes(&mut b, &other, true)?;
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    while !(a.is_finished() && b.is_finished()) {
        let mut both = [&mut a, &mut b];
        let pieces = t2w.next_pieces(&mut both)?;
        let mut pieces = pieces.into_iter();
        wa.extend(pieces.next().flatten());
        wb.extend(pieces.next().flatten());
    }
    let (alone_b, _) = {
        let mut s = t2w.start_stream(Some("Chelsie"), 9)?;
        t2w.push_codes(&mut s, &other, true)?;
        let mut v = Vec::new();
        while let Some(p) = t2w.next_piece(&mut s)? {
            v.push(p);
        }
        (Tensor::cat(&v, 0), ())
    };
    for (name, batched, alone) in [
        ("Ethan", Tensor::cat(&wa, 0), &at_once),
        ("Chelsie", Tensor::cat(&wb, 0), &alone_b),
    ] {
        assert_eq!(batched.size(), alone.size(), "{name}: sample count");
        let err = max_abs(&(&batched - alone));
        assert!(err < 1e-4 * max_abs(alone), "{name}: batched off by {err}");
    }
    // A short answer is one piece, equal to the whole.
    let short = &codes[..6];
    let (one, n) = chunked(&t2w, short, usize::MAX, 7)?;
    assert_eq!(n, 1);
    assert!(one.allclose(&t2w.synthesize(short, Some("Ethan"), 7)?, 1e-5, 1e-6, false));
    // The talker's framing: a leading BOS (65) goes, a codec end (66) or
    // pad (64) ends the codes, and later ids are not read.
    let mut s = t2w.start_stream(None, 1)?;
    t2w.push_codes(&mut s, &[65, 1, 2], false)?;
    t2w.push_codes(&mut s, &[65, 3, 66, 4], false)?;
    t2w.push_codes(&mut s, &[5], false)?;
    assert_eq!(s.num_codes(), 4);
    assert!(
        t2w.piece_ready(&s),
        "codes ended by a codec end are complete"
    );
    // Codes outside the vocabulary are named.
    let mut s = t2w.start_stream(None, 1)?;
    let e = t2w
        .push_codes(&mut s, &[1, 900], false)
        .err()
        .ok_or("code 900 taken")?;
    assert!(e.to_string().contains("900"), "{e}");
    Ok(())
}
