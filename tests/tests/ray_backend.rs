//! `runtime.backend: ray` on a local multi-node Ray cluster
//! (`ray.cluster_utils.Cluster`, started by `tests/python/ray_cluster.py`):
//! each worker node has its own custom resource, and each stage's bundle
//! asks for one node's resource, so Ray puts the stages where the test says.
//!
//! One test (the cluster takes a while to start), in order:
//! 0. No cluster at the configured address: a clear error.
//! 1. `default` with stage 0 and stage 1 on different nodes: greedy tokens
//!    equal transformers' (`default-pipeline.json`, which the local backend
//!    equals too); stage 1's clock skewed 2 s behind still gives a merged
//!    trace whose arrows run forward.
//! 2. `qwen2_5_omni` over both nodes: text and speech equal transformers'.
//! 3. `default` again; the node of stage 1 removed mid-request: the request
//!    ends with `StageDied` naming stage 1, the pipeline reports it, and
//!    shutdown leaves nothing behind.
//!
//! After each pipeline: every stage process gone, no placement group left,
//! no actor alive, no stage's private directory left. Skips (saying so)
//! where Ray is not installed; `scripts/test` says so too. One test per
//! file: it sets `VLLM_TORCH_PROFILER_DIR` and the clock skew for the
//! stages it starts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use omni_core::{
    AsyncOmni, OmniEngineArgs, OmniRequestOutput, PipelineConfig, Prompt, SamplingParams,
    StageSamplingParams,
};
use omni_tests::{
    alive, default_pipeline_fixture, err, json_ids, python, read_trace, repo_root, Result,
};
use serde_json::{json, Value};

const NODES: [&str; 2] = ["omni_node_a", "omni_node_b"];
const SKEW_US: i64 = -2_000_000;

/// The test's Ray cluster; shut down (EOF on its stdin) on drop.
struct Cluster {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    address: String,
    nodes: Value,
}

impl Cluster {
    /// `None` when Ray is not installed (the test then skips).
    fn start() -> Result<Option<Self>> {
        let py = python();
        let probe = Command::new(&py).args(["-c", "import ray"]).output()?;
        if !probe.status.success() {
            eprintln!(
                "SKIPPED: ray is not installed in {} ({})",
                py.display(),
                String::from_utf8_lossy(&probe.stderr).trim()
            );
            return Ok(None);
        }
        let mut child = Command::new(&py)
            .arg(repo_root().join("tests/python/ray_cluster.py"))
            .args(NODES)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("cluster stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut cluster = Cluster {
            child,
            stdin,
            lines,
            address: String::new(),
            nodes: Value::Null,
        };
        let first = cluster.line(Duration::from_secs(300))?;
        cluster.address = first["address"].as_str().ok_or("cluster address")?.into();
        cluster.nodes = first["nodes"].clone();
        Ok(Some(cluster))
    }

    fn line(&self, timeout: Duration) -> Result<Value> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .map_err(|e| err(format!("the cluster helper did not answer: {e}")))?;
        Ok(serde_json::from_str(&line)?)
    }

    fn ask(&mut self, request: Value) -> Result<Value> {
        let stdin = self.stdin.as_mut().ok_or("cluster stdin")?;
        writeln!(stdin, "{request}")?;
        stdin.flush()?;
        let answer = self.line(Duration::from_secs(120))?;
        if answer["op"] == "error" {
            return Err(err(format!("cluster helper: {answer}")));
        }
        Ok(answer)
    }

    fn node_id(&self, resource: &str) -> String {
        self.nodes[resource]["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Placement groups not removed, actors alive.
    fn leftovers(&mut self) -> Result<(u64, u64)> {
        let pgs = self.ask(json!({"op": "placement_groups"}))?["live"]
            .as_u64()
            .ok_or("live")?;
        let actors = self.ask(json!({"op": "actors"}))?["alive"]
            .as_u64()
            .ok_or("alive")?;
        Ok((pgs, actors))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` on the test's cluster, stage `i` on the node with resource
/// `nodes[i]`.
fn on_ray(config: &mut PipelineConfig, cluster: &Cluster, nodes: &[&str]) {
    config.runtime.backend = omni_runtime::Backend::Ray;
    config.runtime.ray.address = Some(cluster.address.clone());
    config.runtime.ray.python = Some(python().to_string_lossy().into_owned());
    for (stage, node) in config.stages.iter_mut().zip(nodes) {
        // A node has one of its resource: the stages placed on it share it.
        let share = 1.0 / nodes.iter().filter(|n| *n == node).count() as f64;
        stage.runtime.resources = BTreeMap::from([((*node).to_owned(), share)]);
    }
}

/// The stages' private directories (`omni-ray-stage-*` under the temp dir)
/// that exist now.
fn stage_dirs() -> Vec<std::path::PathBuf> {
    let tmp = std::env::temp_dir();
    std::fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("omni-ray-stage-"))
        })
        .collect()
}

/// After a pipeline's shutdown: no stage process, placement group, actor
/// or stage directory is left (but `lost`'s, a stage killed with its node).
fn nothing_left(cluster: &mut Cluster, pids: &[u32], what: &str) -> Result {
    nothing_left_but(cluster, pids, what, None)
}

fn nothing_left_but(
    cluster: &mut Cluster,
    pids: &[u32],
    what: &str,
    lost: Option<usize>,
) -> Result {
    assert!(
        omni_tests::wait_until(Duration::from_secs(30), || pids.iter().all(|&p| !alive(p))),
        "{what}: a stage process outlived shutdown: {pids:?}"
    );
    let mut left = (1, 1);
    for _ in 0..60 {
        left = cluster.leftovers()?;
        if left == (0, 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(left, (0, 0), "{what}: (placement groups, actors) left");
    let lost = lost.map(|s| format!("omni-ray-stage-{s}-"));
    let dirs: Vec<_> = stage_dirs()
        .into_iter()
        .filter(|d| {
            lost.as_ref().is_none_or(|l| {
                !d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(l.as_str()))
            })
        })
        .collect();
    assert!(dirs.is_empty(), "{what}: stage directories left: {dirs:?}");
    Ok(())
}

/// Every final output of one request, in order.
async fn run(
    omni: &AsyncOmni,
    prompt: Prompt,
    params: impl Into<StageSamplingParams>,
    id: &str,
) -> Result<Vec<OmniRequestOutput>> {
    let mut stream = omni.generate(prompt, params, id.to_owned()).await?;
    let mut outs = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(out) = stream.next().await {
            outs.push(out?);
        }
        Ok::<_, omni_core::Error>(())
    })
    .await
    .map_err(|_| err(format!("request {id} hung")))??;
    Ok(outs)
}

fn finished(outs: &[OmniRequestOutput], stage: usize) -> Result<&OmniRequestOutput> {
    outs.iter()
        .rfind(|o| o.stage_id == stage && o.finished)
        .ok_or_else(|| err(format!("no finished output of stage {stage}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_pipelines_run_across_the_nodes_of_a_ray_cluster() -> Result {
    omni_tests::ensure_binaries()?;
    let Some(mut cluster) = Cluster::start()? else {
        return Ok(());
    };
    let traces = tempfile::tempdir()?;
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", traces.path());
    std::env::set_var("OMNI_TEST_CLOCK_SKEW_US", format!("1:{SKEW_US}"));
    let (a, b) = (cluster.node_id(NODES[0]), cluster.node_id(NODES[1]));

    // No cluster at the address: a clear error, at once, nothing left.
    let mut config = PipelineConfig::builtin("default")?;
    on_ray(&mut config, &cluster, &NODES);
    config.runtime.ray.address = Some("127.0.0.1:1".into());
    let e = AsyncOmni::from_config(config, &OmniEngineArgs::new("default"))
        .await
        .err()
        .ok_or("started without a cluster")?;
    assert!(
        e.to_string()
            .contains("cannot connect to the Ray cluster at 127.0.0.1:1"),
        "{e}"
    );
    assert!(!a.is_empty() && a != b, "{}", cluster.nodes);

    // 1. default, one stage per node.
    let fixture = default_pipeline_fixture()?;
    let expected = &fixture["stages"];
    let mut config = PipelineConfig::builtin("default")?;
    for s in &mut config.stages {
        // fp32, as the reference (see runtime_pipeline).
        s.engine_args.dtype = Some("float32".into());
        s.engine_args.weight_precision = Some("fp32".into());
    }
    on_ray(&mut config, &cluster, &NODES);
    let started = Instant::now();
    let omni = AsyncOmni::from_config(config, &OmniEngineArgs::new("default")).await?;
    eprintln!("default on ray: ready in {:?}", started.elapsed());
    let stages = omni.stages().to_vec();
    assert_eq!(
        stages
            .iter()
            .map(|s| s.ray_node_id.clone())
            .collect::<Vec<_>>(),
        vec![Some(a.clone()), Some(b.clone())],
        "stage 0 on {}, stage 1 on {}",
        NODES[0],
        NODES[1]
    );
    assert!(stages.iter().all(|s| s.input_address.starts_with("tcp://")));
    omni.start_profile(None).await?;
    let prompt = Prompt::Text(expected[0]["prompt"].as_str().ok_or("prompt")?.into());
    let greedy = |n: usize| SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    let outs = run(
        &omni,
        prompt,
        StageSamplingParams::PerStage(vec![greedy(24), greedy(12)]),
        "ray-default",
    )
    .await?;
    assert_eq!(
        finished(&outs, 0)?.token_ids,
        json_ids(&expected[0]["token_ids"]),
        "stage 0"
    );
    assert_eq!(
        finished(&outs, 1)?.token_ids,
        json_ids(&expected[1]["token_ids"]),
        "stage 1"
    );
    let files = omni.stop_profile().await?;
    let pids: Vec<u32> = stages.iter().map(|s| s.pid).collect();
    omni.shutdown().await?;
    nothing_left(&mut cluster, &pids, "default")?;

    // Stage 1's clock is 2 s behind: its raw times say it took the request
    // in before stage 0 sent it; merged, every arrow runs forward.
    let trace = |s: usize| -> Result<Value> {
        read_trace(files.get(&s).and_then(|f| f.first()).ok_or("a trace")?)
    };
    let first = |t: &Value, name: &str| {
        t["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["ph"] == "X" && e["name"] == name)
            .and_then(|e| e["ts"].as_f64())
    };
    let (t0, t1) = (trace(0)?, trace(1)?);
    let (send, recv) = (
        first(&t0, "stage_send").ok_or("a send")?,
        first(&t1, "stage_recv").ok_or("a receive")?,
    );
    assert!(recv < send, "the skew shows in the raw traces");
    let offset = t1["omni"]["clock_offset_us"]
        .as_f64()
        .ok_or("recorded offset")?;
    assert!((offset - SKEW_US as f64).abs() < 100_000.0, "{offset}");
    let merged = traces.path().join("merged.json");
    omni_profiler::tools::merge(traces.path(), &merged)?;
    let merged = read_trace(&merged)?;
    let flows = omni_tests::request_flows(&merged);
    assert!(
        !flows.is_empty() && flows.iter().all(|(s, f)| s <= f),
        "{flows:?}"
    );

    // 2. qwen2_5_omni: thinker and code2wav on one node, talker on the other,
    // every tensor through shared memory where it may go (a one-byte
    // threshold), the talker reported as on another host: the thinker must
    // send it its states inline, or the talker cannot read them.
    let qwen = repo_root().join("omni-engine/tests/fixtures/qwen2_5_omni");
    let refs: Value = serde_json::from_slice(&std::fs::read(qwen.join("references.json"))?)?;
    let mut config = PipelineConfig::builtin("qwen2_5_omni")?;
    for s in &mut config.stages {
        s.engine_args.model = qwen.join("tiny").to_string_lossy().into_owned();
    }
    on_ray(&mut config, &cluster, &[NODES[0], NODES[1], NODES[0]]);
    config.runtime.shm_threshold_bytes = Some(1);
    std::env::set_var("OMNI_TEST_RAY_FOREIGN_STAGES", "1");
    let omni = AsyncOmni::from_config(config, &OmniEngineArgs::new("qwen2_5_omni")).await;
    std::env::remove_var("OMNI_TEST_RAY_FOREIGN_STAGES");
    let omni = omni?;
    let case = &refs["talker"]["cases"][0];
    let thinker = &refs["thinker"]["cases"][case["prompt_index"].as_u64().ok_or("index")? as usize];
    let speaker = case["speaker"].as_str().ok_or("speaker")?;
    let wav = &case["with_codec_prefix"]["token2wav"];
    let (n, m) = (
        refs["thinker"]["max_new_tokens"].as_u64().ok_or("n")? as usize,
        refs["talker"]["max_new_tokens"].as_u64().ok_or("m")? as usize,
    );
    let params = omni_tests::qwen_params(n, m, speaker, wav["seed"].as_u64());
    let outs = run(
        &omni,
        Prompt::TokenIds(json_ids(&thinker["prompt_ids"])),
        params,
        "ray-qwen",
    )
    .await?;
    assert_eq!(
        finished(&outs, 0)?.token_ids,
        json_ids(&thinker["generated_ids"])
    );
    let audio = finished(&outs, 2)?.audio.as_ref().ok_or("no audio")?;
    let want = omni_tests::read_f32(&qwen.join(wav["wav"]["file"].as_str().ok_or("file")?))?;
    omni_tests::assert_waveform("qwen on ray", &audio.samples, &want, 0.01)?;
    let pids: Vec<u32> = omni.stages().iter().map(|s| s.pid).collect();
    omni.shutdown().await?;
    nothing_left(&mut cluster, &pids, "qwen2_5_omni")?;

    // 3. A node lost mid-request.
    let mut config = PipelineConfig::builtin("default")?;
    on_ray(&mut config, &cluster, &NODES);
    let omni = AsyncOmni::from_config(config, &OmniEngineArgs::new("default")).await?;
    let pids: Vec<u32> = omni.stages().iter().map(|s| s.pid).collect();
    let mut stream = omni
        .generate(
            Prompt::Text("Tell me a long story.".into()),
            // Stage 0 writes on (no early end) while the node goes.
            StageSamplingParams::PerStage(vec![
                SamplingParams {
                    min_tokens: 2000,
                    ..greedy(2000)
                },
                greedy(8),
            ]),
            "ray-lost".to_owned(),
        )
        .await?;
    // Stage 0 is writing (its first output came back).
    stream.next().await.ok_or("no first output")??;
    let lost = Instant::now();
    cluster.ask(json!({"op": "remove_node", "resource": NODES[1], "graceful": false}))?;
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(out) = stream.next().await {
            if let Err(e) = out {
                return Some(e.to_string());
            }
        }
        None
    })
    .await
    .map_err(|_| err("the request hung after its stage's node was lost"))?;
    let e = ended.ok_or("the request ended without an error")?;
    eprintln!(
        "node lost: the request failed after {:?}: {e}",
        lost.elapsed()
    );
    assert!(e.contains("stage 1") && e.contains("died"), "{e}");
    assert!(omni.check_serving().is_err());
    omni.shutdown().await?;
    // Ray SIGKILLs the processes of a lost node's workers: stage 1 could not
    // remove its directory (on a real lost node, it is gone with the node).
    nothing_left_but(&mut cluster, &pids, "default after a lost node", Some(1))?;

    // The next stage started on the host removes it (its owner's lock is
    // free). Both stages on the node that is left.
    let mut config = PipelineConfig::builtin("default")?;
    on_ray(&mut config, &cluster, &[NODES[0], NODES[0]]);
    let omni = AsyncOmni::from_config(config, &OmniEngineArgs::new("default")).await?;
    let pids: Vec<u32> = omni.stages().iter().map(|s| s.pid).collect();
    omni.shutdown().await?;
    nothing_left(&mut cluster, &pids, "default on the node that is left")?;
    Ok(())
}
