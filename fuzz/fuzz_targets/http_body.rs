//! The server's request checks on arbitrary bodies (the first byte picks
//! /v1/completions or /v1/chat/completions): a 4xx naming what is wrong,
//! or a plan for the pipeline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omni_cli::serve::PipelineView;
use omni_engine::SamplingParams;

fn view() -> PipelineView {
    PipelineView {
        served_names: vec!["default".into()],
        defaults: vec![SamplingParams::default(), SamplingParams::default()],
        completion_max_tokens: None,
        max_model_len: vec![Some(2048), Some(2048)],
        finals: vec![(0, "text".into()), (1, "text".into())],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let view = view();
    let planned = if which % 2 == 0 {
        view.plan_completion(body).map(|(plan, _)| plan)
    } else {
        view.plan_chat(body).map(|(plan, _)| plan)
    };
    match planned {
        Ok(plan) => {
            assert!(!plan.prompts.is_empty());
            assert_eq!(plan.params.len(), 2);
        }
        Err(e) => {
            let status = e.status.as_u16();
            assert!((400..500).contains(&status), "status {status}");
        }
    }
});
