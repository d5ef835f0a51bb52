//! The default model's GGUF (fetched by `scripts/setup`): it resolves by
//! alias, passes its checksum, opens, names architecture `llama`, and its
//! dequantized, un-permuted weights equal what transformers loads.
use omni_engine::{Architecture, Device, GgmlType, GgufFile, Kind, ModelSource};

#[path = "fixtures/reference.rs"]
mod reference;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn default_model_header_names_llama() -> TestResult {
    let path = omni_engine::resolve_model_path("smollm2")?;
    assert_eq!(path, reference::default_gguf());
    let g = GgufFile::open(&path)?;
    assert_eq!(g.architecture()?, "llama");
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(
        g.tensor_info("token_embd.weight").map(|t| t.ggml_type),
        Some(GgmlType::Q8_0)
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.weight").map(|t| t.ggml_type),
        Some(GgmlType::Q4_1)
    );
    assert!(
        g.tensor_info("output.weight").is_none(),
        "SmolLM2 ties its embeddings"
    );
    Ok(())
}

#[test]
fn default_model_config_from_metadata() -> TestResult {
    let src = ModelSource::open("HuggingFaceTB/SmolLM2-135M-Instruct")?;
    assert_eq!(src.name(), "SmolLM2-135M-Instruct");
    assert_eq!(src.format_name(), "gguf");
    let c = src.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (49152, 576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    Ok(())
}

/// Sums and the top-left 8x8 block of a few tensors, against transformers'
/// own GGUF load (which un-permutes q/k): catches a wrong nibble order,
/// scale, or permutation.
#[test]
fn default_model_weights_match_transformers() -> TestResult {
    let probes = reference::WeightProbes::load()?;
    let src = ModelSource::open("smollm2")?;
    let weights = src.load_weights(Kind::Float, Device::Cpu)?;
    assert_eq!(weights.len(), 272);
    assert!(!weights.contains("lm_head.weight"));
    for p in &probes.tensors {
        let t = weights.get(&p.name)?;
        assert_eq!(t.size(), p.shape, "{}", p.name);
        assert_eq!(t.kind(), Kind::Float);
        let sum = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        let abs_sum = t
            .to_kind(Kind::Double)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]);
        assert!(
            (sum - p.sum).abs() <= 1e-6 * p.abs_sum.max(1.0),
            "{}: sum {sum} vs {}",
            p.name,
            p.sum
        );
        assert!(
            (abs_sum - p.abs_sum).abs() <= 1e-6 * p.abs_sum.max(1.0),
            "{}: abs sum",
            p.name
        );
        let block = if t.dim() == 2 {
            t.narrow(0, 0, 8).narrow(1, 0, 8)
        } else {
            t.narrow(0, 0, 8).unsqueeze(0)
        };
        for (r, row) in p.block.iter().enumerate() {
            for (c, want) in row.iter().enumerate() {
                let got = block.double_value(&[r as i64, c as i64]);
                assert!(
                    (got - want).abs() <= 1e-6,
                    "{}[{r}][{c}]: {got} vs {want}",
                    p.name
                );
            }
        }
    }
    Ok(())
}
