//! The experiment config schema. Every section rejects unknown keys; defaults are stated on the
//! field they fill.

use std::path::PathBuf;

use distillery_data::CorpusFormat;
use distillery_model::RopeScaling;
use distillery_quant::{GptqSettings, QuantSettings};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelSection,
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The frozen teacher of a distillation run (`distillery distill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherConfig>,
    /// The distillation loss of a distillation run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// How a distilled student starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<StudentConfig>,
    /// Post-training quantization of the run's model (`distillery quantize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeConfig>,
    /// What `distillery export CONFIG` writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportConfig>,
    /// How `distillery generate` and `bench generate` decode with a draft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Names the run's directories: `<checkpoint_dir>/<name>/` and `<experiment_dir>/<name>/`.
    pub name: String,
    /// Every random draw (initialization, data order, dropout) derives from this seed.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub backend: Backend,
    /// Which device of the backend: the N-th GPU or adapter it finds. The CPU backends have
    /// one device, 0.
    // Defaults are left out when saved, so that configs written before these keys existed
    // keep their pipeline fingerprints.
    #[serde(default, skip_serializing_if = "is_first_device")]
    pub device: usize,
    /// The precision parameters and activations are stored and computed in.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
    #[serde(default = "default_checkpoint_dir")]
    pub checkpoint_dir: PathBuf,
    #[serde(default = "default_experiment_dir")]
    pub experiment_dir: PathBuf,
}

/// The compute backend. burn picks backends at run time from a `Device`; a backend that is
/// not compiled in is an error when the run starts, never a fallback to another one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// burn-flex on the CPU, with distillery's fused kernels.
    #[default]
    Cpu,
    /// burn's CubeCL wgpu runtime: Vulkan, Metal or DX12, whichever the machine offers.
    Wgpu,
    /// LibTorch on the CPU (cargo feature `tch`).
    TchCpu,
    /// LibTorch on an NVIDIA GPU (cargo feature `tch`, a CUDA build of libtorch).
    TchCuda,
    /// burn's CubeCL CUDA runtime (cargo feature `cuda`; needs only the NVIDIA driver).
    Cuda,
}

impl Backend {
    pub const ALL: [Backend; 5] = [
        Backend::Cpu,
        Backend::Wgpu,
        Backend::TchCpu,
        Backend::TchCuda,
        Backend::Cuda,
    ];

    /// The name a config spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::TchCpu => "tch-cpu",
            Backend::TchCuda => "tch-cuda",
            Backend::Cuda => "cuda",
        }
    }
}

/// Floating-point precision of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

fn is_first_device(device: &usize) -> bool {
    *device == 0
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A file, or a folder of files read in the order of their paths; relative paths are
    /// relative to the working directory.
    pub corpus: PathBuf,
    /// How the corpus's files are read: `text` (each file a document), `jsonl` (each line's
    /// `text_field` a document) or `chat` (each line's `messages` a conversation, rendered with
    /// the tokenizer's chat template, the loss counted on the assistant's turns only).
    #[serde(default, skip_serializing_if = "is_plain_text")]
    pub format: CorpusFormat,
    /// The field holding each line's text with `format = "jsonl"` (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
    /// A Hugging Face `tokenizer.json`; with `model.from`, the model's own tokenizer, which
    /// this may name but not contradict.
    #[serde(default)]
    pub tokenizer: PathBuf,
    /// Where the token cache is written; defaults to the corpus's directory.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// The share of the corpus, taken from its end, kept for validation.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Tokens per training window.
    pub seq_len: usize,
}

/// The model: a named preset, explicit Hugging Face fields, a preset with some fields
/// overridden, or a pretrained model's file (`from`) that every field comes from.
/// `vocab_size` defaults to the tokenizer's vocabulary size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file or a Hugging Face Llama folder whose architecture and tokenizer the run
    /// takes; any field also set here must agree with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Rotary-frequency scaling, as Hugging Face's `rope_scaling` (a table with `rope_type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Dropout on embeddings and residual branches during training.
    #[serde(default)]
    pub dropout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate, reached after the warm-up.
    pub lr: f64,
    /// The floor the cosine decay ends at.
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decoupled (AdamW) weight decay, applied to matrices only, never to norm gains.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this value; none when absent.
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Validate every this many steps (and at the end).
    #[serde(default = "default_eval_every")]
    pub every: usize,
    /// Windows per validation batch; defaults to the training batch size.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Use only the first this many validation windows.
    #[serde(default)]
    pub max_windows: Option<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: default_eval_every(),
            batch_size: None,
            max_windows: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (and at the end, and on Ctrl-C).
    #[serde(default = "default_checkpoint_every")]
    pub every: usize,
    /// Keep the newest this many step checkpoints; `best/` is kept apart.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: default_checkpoint_every(),
            keep: default_keep(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Without a terminal, print a progress line every this many steps.
    #[serde(default = "default_log_every")]
    pub every: usize,
    /// Write TensorBoard event files under `<experiment_dir>/<name>/tb/`.
    #[serde(default = "yes")]
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every: default_log_every(),
            tensorboard: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// A distillery run directory (`checkpoints/<run>`) or one of its checkpoint directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// A pretrained model's file: a GGUF file or a Hugging Face Llama folder; instead of
    /// `checkpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// A Hugging Face Llama folder (`config.json`, safetensors weights, `tokenizer.json`);
    /// instead of `checkpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_dir: Option<PathBuf>,
    /// Which checkpoint of a run directory teaches; ignored for a checkpoint directory.
    #[serde(default)]
    pub select: TeacherCheckpoint,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherCheckpoint {
    /// `best/`, the checkpoint with the lowest validation loss.
    #[default]
    Best,
    /// The newest complete checkpoint.
    Latest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The divergence between the temperature-softened teacher and student distributions.
    #[serde(default)]
    pub loss: DistillLoss,
    /// Softmax temperature of both distributions; the divergence is multiplied by its square.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the distillation term; `1 - alpha` weighs cross-entropy on the labels.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Teacher weight in the mixture of the generalized Jensen-Shannon divergence (`jsd` only).
    #[serde(default = "default_jsd_beta")]
    pub beta: f64,
    /// Run the teacher at every step, or read its top-k logits from the cache that
    /// `distillery teacher-cache` wrote.
    #[serde(default)]
    pub teacher: TeacherSource,
    /// How many of the teacher's largest logits per token the cache keeps.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherSource {
    #[default]
    Live,
    /// The teacher cache: each position's top-k logits and the mass of the rest of the
    /// vocabulary, a distribution over k + 1 outcomes.
    Cached,
}

impl DistillConfig {
    /// `alpha = 0`: the student learns from the labels alone (a baseline that starts where the
    /// distilled student does) and the teacher never enters the loss.
    pub fn labels_only(&self) -> bool {
        self.alpha == 0.0
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            loss: DistillLoss::default(),
            temperature: default_temperature(),
            alpha: default_alpha(),
            beta: default_jsd_beta(),
            teacher: TeacherSource::default(),
            top_k: default_top_k(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillLoss {
    /// KL(teacher || student), as in Hinton et al.
    #[default]
    ForwardKl,
    /// KL(student || teacher), as in MiniLLM.
    ReverseKl,
    /// Generalized Jensen-Shannon divergence with weight `beta`, as in GKD.
    Jsd,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    #[serde(default)]
    pub init: StudentInit,
    /// With `init = "from_teacher"`: the teacher layers copied into the student's layers, in
    /// order (DistilBERT-style); one per student layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudentInit {
    /// Fresh weights from the run's seed.
    #[default]
    Random,
    /// Embeddings, norms and a subset of the teacher's layers, cut to the student's widths
    /// where it is narrower (the channels, heads and neurons the teacher uses most).
    FromTeacher,
}

/// Post-training quantization; key names follow AutoGPTQ's `quantize_config.json` where they
/// mean the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeConfig {
    pub method: QuantizeMethod,
    /// Code width: 2, 3, 4 or 8 (default 4; `int8` is always 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// Input columns sharing one scale and zero per output channel; -1 for whole rows
    /// (default 128, or 32 for `int8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
    /// Grids centred on zero (AutoGPTQ's default); otherwise each grid spans its group's range.
    #[serde(default = "yes")]
    pub sym: bool,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal (AutoGPTQ's `desc_act`).
    #[serde(default)]
    pub act_order: bool,
    /// GPTQ: fix every group's grid before quantizing, so act-order keeps groups contiguous.
    #[serde(default)]
    pub static_groups: bool,
    /// RTN and GPTQ: search each grid's range for the least rounding error, clipping the
    /// largest weights when finer steps pay for it (the reference GPTQ code's `mse` option;
    /// off in AutoGPTQ). Costs 80 trial roundings per grid.
    #[serde(default)]
    pub clip_search: bool,
    /// GPTQ: inside a block, calibrate each sublayer on the outputs of the already-quantized
    /// ones (q,k,v → o → gate,up → down).
    #[serde(default = "yes")]
    pub true_sequential: bool,
    /// GPTQ: dampening added to the Hessian's diagonal, as a share of its mean.
    #[serde(default = "default_damp_percent")]
    pub damp_percent: f64,
    /// GPTQ: columns quantized between lazy batch updates.
    #[serde(default = "default_gptq_block_size")]
    pub block_size: usize,
    /// GPTQ: calibration windows.
    #[serde(default = "default_nsamples")]
    pub nsamples: usize,
    /// GPTQ: tokens per calibration window (default `data.seq_len`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqlen: Option<usize>,
    /// GPTQ: a text file, or a distillery token cache (`.tokens`) made with the run's tokenizer,
    /// to draw calibration windows from instead of the training split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<PathBuf>,
    /// Quantize the token embedding too (round-to-nearest: a lookup table has no Hessian).
    #[serde(default)]
    pub quantize_embeddings: bool,
    /// Quantize the untied output projection too.
    #[serde(default)]
    pub quantize_lm_head: bool,
    /// The model to quantize: a run or checkpoint directory, or a pretrained model's GGUF file
    /// or Hugging Face folder (default the run's directory, whose `best/` checkpoint is taken,
    /// or `model.from` while the run has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// Names the output `<checkpoint_dir>/<name>/` (default `<run>-<method and settings>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizeMethod {
    /// Symmetric absmax int8, per output channel or group.
    Int8,
    /// Round-to-nearest on a uniform grid: the baseline GPTQ is judged against.
    Rtn,
    /// GPTQ (Frantar et al. 2022): Hessian-calibrated rounding, block by block.
    Gptq,
}

impl QuantizeConfig {
    pub fn bits(&self) -> u32 {
        match self.method {
            QuantizeMethod::Int8 => 8,
            _ => self.bits.unwrap_or(4),
        }
    }

    /// Columns per group; `None` for one group per output channel. int8 defaults to groups of
    /// 32, llama.cpp's Q8_0 layout, which a GGUF export keeps unchanged and which loses less
    /// than one scale per row.
    pub fn group_size(&self) -> Option<usize> {
        let default = match self.method {
            QuantizeMethod::Int8 => 32,
            _ => 128,
        };
        usize::try_from(self.group_size.unwrap_or(default)).ok()
    }

    /// How every matrix is quantized, the section's defaults resolved; the GPTQ-only fields
    /// serve `method = "gptq"`.
    pub fn gptq_settings(&self) -> GptqSettings {
        GptqSettings {
            quant: QuantSettings {
                bits: self.bits(),
                group_size: self.group_size(),
                symmetric: self.sym,
                clip_search: self.clip_search,
            },
            damp_percent: self.damp_percent,
            block_size: self.block_size,
            act_order: self.act_order,
            static_groups: self.static_groups,
        }
    }

    /// A directory name that tells the settings apart: `int8`, `rtn-4bit-g128`,
    /// `gptq-3bit-g128-act`.
    pub fn label(&self) -> String {
        let method = match self.method {
            QuantizeMethod::Int8 => "int8".to_string(),
            QuantizeMethod::Rtn => format!("rtn-{}bit", self.bits()),
            QuantizeMethod::Gptq => format!("gptq-{}bit", self.bits()),
        };
        let groups = self
            .group_size()
            .map_or(String::new(), |size| format!("-g{size}"));
        let act_order = if self.act_order { "-act" } else { "" };
        // Validation refuses the search for int8.
        let clipped = if self.clip_search { "-clip" } else { "" };
        let asymmetric = if self.sym || self.method == QuantizeMethod::Int8 {
            ""
        } else {
            "-asym"
        };
        format!("{method}{groups}{act_order}{clipped}{asymmetric}")
    }
}

impl QuantizeConfig {
    /// The directory name of the quantized model, under `run.checkpoint_dir`.
    pub fn output_name(&self, run_name: &str) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{run_name}-{}", self.label()))
    }
}

/// The exports `distillery export CONFIG` writes, each named after the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub formats: Vec<ExportFormatName>,
    /// The GGUF files' weight types (default q8_0).
    #[serde(default = "default_gguf_types")]
    pub gguf_types: Vec<GgufTypeName>,
    /// The model of the hf and gguf exports (default: the run directory's best checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// The quantized model folder of the gptq export (default: what the config's [quantize]
    /// section writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized: Option<PathBuf>,
    /// Where the exports go (default `<checkpoint_dir>/<run>-export/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<PathBuf>,
}

impl ExportConfig {
    pub fn out_dir(&self, config: &ExperimentConfig) -> PathBuf {
        self.out_dir.clone().unwrap_or_else(|| {
            config
                .run
                .checkpoint_dir
                .join(format!("{}-export", config.run.name))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormatName {
    Hf,
    Gguf,
    Gptq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GgufTypeName {
    F32,
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl ExportFormatName {
    pub const ALL: [ExportFormatName; 3] = [Self::Hf, Self::Gguf, Self::Gptq];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hf => "hf",
            Self::Gguf => "gguf",
            Self::Gptq => "gptq",
        }
    }
}

impl GgufTypeName {
    pub const ALL: [GgufTypeName; 4] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0];

    /// The name configs and the command line spell it with, and exported files carry.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }
}

/// A name that is none of a fixed list's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{name}\" is not one of {}", choices.join(", "))]
pub struct UnknownName {
    pub name: String,
    pub choices: Vec<&'static str>,
}

/// Parses a name from a fixed list.
fn by_name<T: Copy>(
    name: &str,
    all: &[T],
    name_of: fn(T) -> &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|&item| name_of(item) == name)
        .ok_or_else(|| UnknownName {
            name: name.to_string(),
            choices: all.iter().map(|&item| name_of(item)).collect(),
        })
}

impl std::str::FromStr for ExportFormatName {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, UnknownName> {
        by_name(name, &Self::ALL, Self::name)
    }
}

impl std::str::FromStr for GgufTypeName {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, UnknownName> {
        by_name(name, &Self::ALL, Self::name)
    }
}

fn default_gguf_types() -> Vec<GgufTypeName> {
    vec![GgufTypeName::Q8_0]
}

fn default_damp_percent() -> f64 {
    0.01
}

fn default_gptq_block_size() -> usize {
    128
}

fn default_nsamples() -> usize {
    128
}

/// Text configs serialize as they did before corpora had formats, so their runs still resume.
fn is_plain_text(format: &CorpusFormat) -> bool {
    *format == CorpusFormat::Text
}

fn default_temperature() -> f64 {
    2.0
}

fn default_alpha() -> f64 {
    0.5
}

fn default_jsd_beta() -> f64 {
    0.5
}

fn default_top_k() -> usize {
    64
}

fn default_checkpoint_dir() -> PathBuf {
    PathBuf::from("checkpoints")
}

fn default_experiment_dir() -> PathBuf {
    PathBuf::from("experiments")
}

fn default_validation_fraction() -> f64 {
    0.1
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

fn default_beta1() -> f64 {
    0.9
}

fn default_beta2() -> f64 {
    0.95
}

fn default_eps() -> f64 {
    1e-8
}

fn default_eval_every() -> usize {
    100
}

fn default_checkpoint_every() -> usize {
    100
}

fn default_keep() -> usize {
    3
}

fn default_log_every() -> usize {
    10
}

/// Speculative decoding's settings for `distillery generate` and `bench generate`; each may
/// instead come from the command line's flag of the same name, and where both give one they
/// must agree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// A smaller model with the model's tokenizer (a checkpoint, run directory, quantized
    /// folder or GGUF file) that drafts tokens for the model to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per pass of the model (the most, when adaptive; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_tokens: Option<usize>,
    /// Two more drafted tokens after a pass that keeps them all, one fewer after a rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_draft: Option<bool>,
    /// Stop drafting before a position where the draft's most likely token has less than
    /// this probability (llama.cpp's `p_min`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_p_min: Option<f32>,
    /// The draft's head scores only this many tokens: the most frequent in the config's
    /// training split, and the stop tokens (default: every token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocabulary: Option<usize>,
}
