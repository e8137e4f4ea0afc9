//! Pipeline configs: an ordered list of stages, each running one distillery command on an
//! experiment config, so one command takes a model from training to its exported files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub pipeline: PipelineSection,
    #[serde(rename = "stage")]
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Names `<experiment_dir>/<name>/`, where the pipeline keeps its state and tables.
    pub name: String,
    #[serde(default = "default_experiment_dir")]
    pub experiment_dir: PathBuf,
    /// Where `<name>/report.md`, `report.ipynb` and the figures go after the last stage; the
    /// pipeline needs an eval stage for it. No report when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub kind: StageKind,
    /// The experiment config the stage runs on.
    pub config: PathBuf,
    /// `--set` overrides of that config.
    #[serde(default)]
    pub set: Vec<String>,
    /// `eval`: the models compared: train, distill or quantize stages, or paths (with a slash)
    /// of checkpoints, GGUF files or Hugging Face folders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Train,
    Distill,
    /// Runs a distillation config's teacher over its training windows once and stores its
    /// top-k logits, for stages that distill from `distill.teacher = "cached"`.
    TeacherCache,
    Quantize,
    Export,
    /// One table of the listed stages' models, with their decoding speed.
    Eval,
}

impl StageKind {
    /// The name a pipeline config gives the kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Distill => "distill",
            Self::TeacherCache => "teacher_cache",
            Self::Quantize => "quantize",
            Self::Export => "export",
            Self::Eval => "eval",
        }
    }
}

fn default_experiment_dir() -> PathBuf {
    PathBuf::from("experiments")
}

/// Reads and checks a pipeline config: stage names are unique plain names, and an `eval`
/// stage's models are earlier train, distill or quantize stages, or paths (with a slash) of
/// model files made elsewhere, such as a pretrained teacher's GGUF file.
pub fn load_pipeline(path: &Path) -> Result<PipelineConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config: PipelineConfig = toml::from_str(&text).map_err(|error| {
        let line = error
            .span()
            .map_or(1, |span| text[..span.start].matches('\n').count() + 1);
        ConfigError::Syntax {
            origin: origin.clone(),
            line,
            message: error.message().to_string(),
        }
    })?;
    let invalid = |key: String, message: String| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        line: None,
        message,
    };
    let plain =
        |name: &str| !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']);
    if !plain(&config.pipeline.name) {
        return Err(invalid(
            "pipeline.name".into(),
            format!(
                "\"{}\" must be a plain directory name",
                config.pipeline.name
            ),
        ));
    }
    if config.stages.is_empty() {
        return Err(invalid("stage".into(), "the pipeline has no stages".into()));
    }
    for (index, stage) in config.stages.iter().enumerate() {
        let key = |field: &str| format!("stage[{index}].{field}");
        if !plain(&stage.name) {
            return Err(invalid(
                key("name"),
                format!("\"{}\" must be a plain name", stage.name),
            ));
        }
        let earlier = &config.stages[..index];
        if earlier.iter().any(|other| other.name == stage.name) {
            return Err(invalid(
                key("name"),
                format!("\"{}\" names two stages", stage.name),
            ));
        }
        match stage.kind {
            StageKind::Eval if stage.models.is_empty() => {
                return Err(invalid(
                    key("models"),
                    "an eval stage compares models".into(),
                ));
            }
            StageKind::Eval => {
                for model in &stage.models {
                    // A path is checked when the stage loads it, as a model file made by an
                    // earlier step of the user's (scripts/fetch-smollm2.sh) may come later.
                    if model.contains(['/', '\\']) {
                        continue;
                    }
                    let source = earlier.iter().find(|other| &other.name == model);
                    let ok = source.is_some_and(|other| {
                        matches!(
                            other.kind,
                            StageKind::Train | StageKind::Distill | StageKind::Quantize
                        )
                    });
                    if !ok {
                        return Err(invalid(
                            key("models"),
                            format!(
                                "\"{model}\" is not an earlier train, distill or quantize stage"
                            ),
                        ));
                    }
                }
            }
            _ if !stage.models.is_empty() => {
                return Err(invalid(
                    key("models"),
                    "only eval stages list models".into(),
                ));
            }
            _ => {}
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<PipelineConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, text).unwrap();
        load_pipeline(&path).map_err(|error| error.to_string())
    }

    const GOOD: &str = r#"
[pipeline]
name = "quick"

[[stage]]
name = "teacher"
kind = "train"
config = "a.toml"

[[stage]]
name = "int8"
kind = "quantize"
config = "b.toml"
set = ["quantize.method=int8"]

[[stage]]
name = "table"
kind = "eval"
config = "b.toml"
models = ["teacher", "int8"]
"#;

    #[test]
    fn stages_keep_their_order_and_settings() {
        let config = load_text(GOOD).unwrap();
        assert_eq!(config.pipeline.experiment_dir, PathBuf::from("experiments"));
        let kinds: Vec<StageKind> = config.stages.iter().map(|stage| stage.kind).collect();
        assert_eq!(
            kinds,
            [StageKind::Train, StageKind::Quantize, StageKind::Eval]
        );
        assert_eq!(config.stages[1].set, ["quantize.method=int8"]);
    }

    #[test]
    fn an_eval_stage_compares_a_model_file_made_elsewhere() {
        let text = GOOD.replacen(
            "models = [\"teacher\", \"int8\"]",
            "models = [\"models/teacher.gguf\", \"int8\"]",
            1,
        );
        let config = load_text(&text).unwrap();
        assert_eq!(config.stages[2].models[0], "models/teacher.gguf");
        // Without a slash, a name must be an earlier stage.
        let error = load_text(&text.replacen("models/teacher.gguf", "teacher.gguf", 1));
        assert!(error.is_err_and(|error| error.contains("\"teacher.gguf\" is not an earlier")),);
    }

    #[test]
    fn each_kind_is_named_as_configs_spell_it() {
        for kind in [
            StageKind::Train,
            StageKind::Distill,
            StageKind::TeacherCache,
            StageKind::Quantize,
            StageKind::Export,
            StageKind::Eval,
        ] {
            let text = format!(
                "name = \"s\"\nkind = {:?}\nconfig = \"a.toml\"",
                kind.name()
            );
            let stage: StageConfig = toml::from_str(&text).unwrap();
            assert_eq!(stage.kind, kind);
        }
    }

    #[test]
    fn bad_pipelines_name_the_key() {
        for (edit, expected) in [
            (
                ("kind = \"train\"", "kind = \"fly\""),
                "unknown variant `fly`",
            ),
            (
                ("name = \"int8\"", "name = \"teacher\""),
                "\"teacher\" names two stages",
            ),
            (
                ("models = [\"teacher\", \"int8\"]", "models = [\"int9\"]"),
                "stage[2].models",
            ),
            (
                ("config = \"a.toml\"", "config = \"a.toml\"\nepochs = 3"),
                "unknown field `epochs`",
            ),
        ] {
            let error = load_text(&GOOD.replacen(edit.0, edit.1, 1)).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
