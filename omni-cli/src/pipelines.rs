//! `omni pipelines`: the built-in pipelines and their stages.
use clap::Args;
use omni_core::PipelineConfig;

/// List the built-in pipelines and their stages.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  omni pipelines")]
pub struct PipelinesArgs {}

pub fn run(_args: PipelinesArgs) -> anyhow::Result<()> {
    for name in PipelineConfig::builtin_names() {
        match PipelineConfig::builtin(name) {
            Ok(config) => {
                println!("{name}: {} stage(s)", config.stages.len());
                for line in omni_core::describe_stages(&config) {
                    println!("  {line}");
                }
            }
            Err(e) => println!("{name}: cannot load: {e}"),
        }
    }
    Ok(())
}
