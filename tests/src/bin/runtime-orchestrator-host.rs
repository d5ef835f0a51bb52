//! Test helper: an orchestrator in a process of its own, so a test can
//! SIGKILL it. Starts the pipeline named by its first argument (with its run
//! directory under the second, when given), prints `READY <run_dir> <pid>...`
//! once every stage is ready, then waits forever.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2".to_string());
    let opts = omni_runtime::OrchestratorOptions {
        run_dir_parent: std::env::args().nth(2).map(Into::into),
        ..Default::default()
    };
    let started = async {
        let config = omni_runtime::PipelineConfig::resolve(&name)?;
        omni_runtime::Orchestrator::start(config, opts).await
    };
    match started.await {
        Ok(orch) => {
            let pids: Vec<String> = orch.stages().iter().map(|s| s.pid.to_string()).collect();
            println!("READY {} {}", orch.run_dir().display(), pids.join(" "));
            std::future::pending::<()>().await;
        }
        Err(e) => {
            println!("ERROR {e}");
            std::process::exit(1);
        }
    }
}
