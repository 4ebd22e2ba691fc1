//! `hugepunch stream`: the conversion stream a confidential guest sends
//! (hugepunch-workload's `stream` model), handled the way VMMs handle it
//! today and through hugepunch — on the kernel model, and on real memory
//! where a backend is named.

use crate::compare::{self, Contender};
use anyhow::Context as _;
use hugepunch_cli::format::{bytes, count, paragraph, table};
use hugepunch_model::{ModelConfig, Options, StrategyKind};
use hugepunch_workload::{Step, StreamModel};
use serde::Serialize;

/// The help of `--backend` here.
#[cfg(target_os = "linux")]
const BACKEND_HELP: &str = "Also replay it on real memory: memfd, guest-memfd, thp or file (with \
--path) [default: none, the kernel model only]";

#[derive(clap::Args)]
#[cfg_attr(target_os = "linux", command(mut_arg("backend", |a| a.help(BACKEND_HELP))))]
pub struct Args {
    /// Guest memory (a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = crate::number)]
    size: u64,
    /// SWIOTLB pool [default: 6% of memory, 2 MiB to 1 GiB]
    #[arg(long, value_parser = crate::number)]
    swiotlb: Option<u64>,
    /// The pieces SWIOTLB is converted in (4K to 2M).
    #[arg(long, default_value = "2M", value_parser = crate::number)]
    swiotlb_chunk: u64,
    /// virtio devices.
    #[arg(long, default_value_t = 4)]
    devices: u64,
    /// Ring pages (4 KiB) per device.
    #[arg(long, default_value_t = 16)]
    ring_pages: u64,
    /// Coherent DMA allocations made shared, then private again.
    #[arg(long, default_value_t = 4096)]
    dma_churn: u64,
    /// How many allocations later each DMA allocation is freed.
    #[arg(long, default_value_t = 64)]
    dma_window: u64,
    /// Bytes the balloon takes, 4 KiB at a time [default: an eighth of
    /// memory]
    #[arg(long, value_parser = crate::number)]
    balloon: Option<u64>,
    /// Bytes free page reporting gives back, 2 MiB at a time [default: an
    /// eighth of memory]
    #[arg(long, value_parser = crate::number)]
    reporting: Option<u64>,
    /// Seed of the scattered pages.
    #[arg(long, default_value_t = hugepunch_workload::DEFAULT_SEED)]
    seed: u64,
    /// Also run the engine with this pending-memory budget (a row of its
    /// own; on real memory, the engine side uses it) [default: none]
    #[arg(long, value_parser = crate::number)]
    budget: Option<u64>,
    #[cfg(target_os = "linux")]
    #[command(flatten)]
    memory: crate::memory_args::MemoryArgs,
    /// Write the stream as a trace (docs/CONTRACT.md §7) to this file
    /// [default: none]
    #[arg(long, value_name = "FILE")]
    write_trace: Option<std::path::PathBuf>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

/// One way of handling the stream, on the model.
#[derive(Debug, Clone, Serialize)]
struct ModelRow {
    /// Who does it this way.
    strategy: String,
    /// Private memory still held at the end (the guest_memfd).
    private_bytes: u64,
    /// Shared memory in use at the end (the same for every strategy).
    shared_bytes: u64,
    /// Both.
    held_bytes: u64,
    /// Frees of private memory (`fallocate` punches).
    free_calls: u64,
    /// Huge pages of private memory split into 4 KiB pieces.
    huge_pages_split: u64,
    /// 2 MiB direct-map entries split.
    direct_map_split: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: StreamModel,
    operations: u64,
    given_back_bytes: u64,
    on_the_model: Vec<ModelRow>,
    #[cfg(target_os = "linux")]
    on_real_memory: Option<hugepunch_linux::RealReport>,
}

fn model_of(a: &Args) -> StreamModel {
    let d = StreamModel::for_size(a.size);
    StreamModel {
        size: a.size,
        swiotlb: a.swiotlb.unwrap_or(d.swiotlb),
        swiotlb_chunk: a.swiotlb_chunk,
        devices: a.devices,
        ring_pages: a.ring_pages,
        dma_churn: a.dma_churn,
        dma_window: a.dma_window,
        balloon: a.balloon.unwrap_or(d.balloon),
        reporting: a.reporting.unwrap_or(d.reporting),
        seed: a.seed,
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let model = model_of(&a);
    let ops = model
        .ops()
        .map_err(|e| crate::arg_error("stream", e.to_string()))?;
    if let Some(path) = &a.write_trace {
        let trace = model.trace().expect("checked above");
        std::fs::write(path, trace.to_text())
            .with_context(|| format!("write the trace to {}", path.display()))?;
    }
    #[cfg(target_os = "linux")]
    let backend = a.memory.asked("stream")?;

    // The kernel model: today's VMMs (eager 4 KiB frees), and hugepunch.
    let steps: Vec<Step> = ops.iter().map(|&op| Step::Op(op)).collect();
    let cfg = ModelConfig::new(model.size);
    let mut contenders = vec![
        Contender {
            kind: StrategyKind::Eager,
            options: Options::default(),
        },
        Contender {
            kind: StrategyKind::HugePunch,
            options: Options::default(),
        },
    ];
    if let Some(b) = a.budget {
        contenders.push(Contender {
            kind: StrategyKind::HugePunch,
            options: Options {
                budget: Some(b),
                ..Options::default()
            },
        });
    }
    let pb = crate::progress::bar((steps.len() * contenders.len()) as u64, !a.json, "model");
    let rows = compare::run_all(cfg, &contenders, &steps, &pb)?;
    pb.finish_and_clear();
    let shared = model.shared_bytes_at_end();
    let mut on_the_model: Vec<ModelRow> = rows
        .iter()
        .map(|r| {
            let m = &r.model.memory;
            ModelRow {
                strategy: match r.strategy {
                    StrategyKind::Eager => "direct 4 KiB".to_string(),
                    _ => r.label.clone(),
                },
                private_bytes: m.resident_bytes,
                shared_bytes: shared,
                held_bytes: m.resident_bytes + shared,
                free_calls: r.model.host.free_calls,
                huge_pages_split: m.huge_pages_ever_split,
                direct_map_split: m.direct_map_entries - m.direct_map_intact,
            }
        })
        .collect();
    // QEMU with a hugetlb-backed shared side skips the discard of the
    // private copy on a conversion to shared (the page is then held twice);
    // its give-backs (balloon, reporting) are freed 4 KiB at a time as
    // before: the same stream without the punches that follow a
    // conversion, on the same eager model.
    let kept: Vec<Step> = ops
        .iter()
        .enumerate()
        .filter(|&(i, op)| {
            !matches!(
                (i.checked_sub(1).map(|j| ops[j]), op),
                (
                    Some(hugepunch_workload::Op::Convert { offset: o, len: l, to: hugepunch::Attribute::Shared }),
                    hugepunch_workload::Op::Punch { offset, len },
                ) if o == *offset && l == *len
            )
        })
        .map(|(_, &op)| Step::Op(op))
        .collect();
    let pb = crate::progress::bar(kept.len() as u64, !a.json, "model");
    let no_discard = compare::run(cfg, contenders[0], &kept, &pb)?;
    pb.finish_and_clear();
    let m = &no_discard.model.memory;
    on_the_model.insert(
        1,
        ModelRow {
            strategy: "no discard".to_string(),
            private_bytes: m.resident_bytes,
            shared_bytes: shared,
            held_bytes: m.resident_bytes + shared,
            free_calls: no_discard.model.host.free_calls,
            huge_pages_split: m.huge_pages_ever_split,
            direct_map_split: m.direct_map_entries - m.direct_map_intact,
        },
    );
    #[cfg(target_os = "linux")]
    let on_real_memory = match backend {
        None => None,
        Some(backend) => {
            crate::real::check_memory(model.size, crate::real::mem_available())?;
            let spinner =
                crate::progress::spinner(!a.json, &format!("conversion stream on {backend}"));
            let opts = hugepunch_linux::RunOptions {
                backend: backend.clone(),
                size: model.size,
                pattern: hugepunch_workload::Pattern::Ascending,
                seed: model.seed,
                budget: a.budget,
            };
            let r = hugepunch_linux::real::run_ops(&opts, "conversion-stream", &ops)
                .with_context(|| format!("the conversion stream on {backend}"))?;
            spinner.finish_and_clear();
            Some(r)
        }
    };
    let report = Report {
        model,
        operations: ops.len() as u64,
        given_back_bytes: model.given_back_bytes(),
        on_the_model,
        #[cfg(target_os = "linux")]
        on_real_memory,
    };
    if a.json {
        crate::write_stdout(&format!("{}\n", serde_json::to_string(&report)?))
    } else {
        crate::write_stdout(&render(&report))
    }
}

fn render(r: &Report) -> String {
    let m = &r.model;
    let mut out = paragraph(
        &format!(
            "hugepunch stream: the conversions and give-backs of a confidential guest with {} of \
             memory ({} operations, seed {}): SWIOTLB {} made shared in {} pieces, {} virtio \
             devices x {} ring pages, {} coherent DMA allocations (freed {} later), balloon {}, \
             free page reporting {}; {} given back in all",
            bytes(m.size),
            count(r.operations),
            m.seed,
            bytes(m.swiotlb),
            bytes(m.swiotlb_chunk),
            m.devices,
            m.ring_pages,
            count(m.dma_churn),
            m.dma_window,
            bytes(m.balloon),
            bytes(m.reporting),
            bytes(r.given_back_bytes),
        ),
        2,
    );
    out += &paragraph(
        "direct 4 KiB: every give-back and the private copy of every page made shared punched \
         at once, as QEMU's kvm_convert_memory and Cloud Hypervisor's \
         punch_holes_in_guest_memfd do; no discard: QEMU with a hugetlb-backed shared side, \
         which skips the discard on conversion (the page is held twice); hugepunch: every \
         punch through the engine.",
        2,
    );
    out += "\non the kernel model:\n";
    let rows: Vec<Vec<String>> = r
        .on_the_model
        .iter()
        .map(|x| {
            vec![
                x.strategy.clone(),
                bytes(x.private_bytes),
                bytes(x.shared_bytes),
                bytes(x.held_bytes),
                count(x.free_calls),
                count(x.huge_pages_split),
                count(x.direct_map_split),
            ]
        })
        .collect();
    out += &table(
        &[
            "VMM",
            "private held",
            "shared",
            "held in all",
            "frees",
            "huge pages split",
            "direct map split",
        ],
        &rows,
    );
    #[cfg(target_os = "linux")]
    if let Some(real) = &r.on_real_memory {
        let (d, e) = (&real.direct, &real.engine);
        let split = |s: &hugepunch_linux::real::Side| match &s.kernel {
            Some(k) => format!("{} (kernel)", count(k.split)),
            None => format!("{} (log)", count(s.huge_pages_split)),
        };
        out += &format!(
            "\non real memory ({}, {}, kernel {}):\n",
            real.backend, real.huge_backing, real.kernel
        );
        let rows = vec![
            vec![
                "private held".to_string(),
                bytes(d.resident_bytes),
                bytes(e.resident_bytes),
            ],
            vec![
                "  of which deferred".to_string(),
                bytes(d.pending_bytes),
                bytes(e.pending_bytes),
            ],
            vec![
                "fallocate calls".to_string(),
                count(d.fallocate_calls),
                count(e.fallocate_calls),
            ],
            vec!["huge pages split".to_string(), split(d), split(e)],
            vec![
                "wall time".to_string(),
                format!("{:.2} ms", d.wall_seconds * 1e3),
                format!("{:.2} ms", e.wall_seconds * 1e3),
            ],
        ];
        out += &table(&["", "direct 4 KiB", "hugepunch"], &rows);
    }
    out
}
