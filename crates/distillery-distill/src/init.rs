//! Starting a student from its teacher's weights: embeddings, norms, output head and a chosen
//! subset of the teacher's decoder layers (DistilBERT's recipe), cut to the student's widths
//! where it is narrower (Minitron's width pruning: the residual channels, attention heads and
//! MLP neurons the teacher uses most on calibration text).

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use distillery_model::{LayerMatrix, Linear, Llama, LlamaConfig, token_windows};
/// The teacher layers a student of `student_layers` layers takes by default: evenly spaced,
/// starting at the first (every other layer when the student has half as many).
pub fn default_teacher_layers(teacher_layers: usize, student_layers: usize) -> Vec<usize> {
    (0..student_layers)
        .map(|index| index * teacher_layers / student_layers)
        .collect()
}

/// Checks that a student of shape `student` can take `layers` from a teacher of shape
/// `teacher`: no width larger than the teacher's, heads of the teacher's size and key-value
/// groups no larger than its own; the error names what differs.
pub(crate) fn check_from_teacher(
    student: &LlamaConfig,
    teacher: &LlamaConfig,
    layers: &[usize],
) -> Result<(), String> {
    let widths = [
        ("hidden_size", student.hidden_size, teacher.hidden_size),
        (
            "intermediate_size",
            student.intermediate_size,
            teacher.intermediate_size,
        ),
        (
            "num_attention_heads",
            student.num_attention_heads,
            teacher.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            student.num_key_value_heads,
            teacher.num_key_value_heads,
        ),
    ];
    let wider: Vec<String> = widths
        .iter()
        .filter(|(_, student, teacher)| student > teacher)
        .map(|(field, student, teacher)| format!("{field} {student} vs the teacher's {teacher}"))
        .collect();
    if !wider.is_empty() {
        return Err(format!(
            "student.init = \"from_teacher\" needs widths no larger than the teacher's: {}",
            wider.join(", ")
        ));
    }
    if student.head_dim() != teacher.head_dim() {
        return Err(format!(
            "student.init = \"from_teacher\" keeps whole heads of the teacher's size: head \
             width {} (hidden_size / num_attention_heads) vs the teacher's {}",
            student.head_dim(),
            teacher.head_dim()
        ));
    }
    if group_size(student) > group_size(teacher) {
        return Err(format!(
            "student.init = \"from_teacher\" keeps query heads inside the teacher's key-value \
             groups: {} query heads per key-value head vs the teacher's {}",
            group_size(student),
            group_size(teacher)
        ));
    }
    if student.rope_theta != teacher.rope_theta {
        return Err(format!(
            "student.init = \"from_teacher\" needs the teacher's rope_theta ({})",
            teacher.rope_theta
        ));
    }
    if student.tie_word_embeddings != teacher.tie_word_embeddings {
        return Err(format!(
            "student.init = \"from_teacher\" needs the same tie_word_embeddings as the teacher \
             ({})",
            teacher.tie_word_embeddings
        ));
    }
    if student.rms_norm_eps != teacher.rms_norm_eps {
        return Err(format!(
            "student.init = \"from_teacher\" needs the teacher's rms_norm_eps ({})",
            teacher.rms_norm_eps
        ));
    }
    if student.vocab_size > teacher.vocab_size {
        return Err(format!(
            "the student's vocabulary ({}) is larger than the teacher's ({})",
            student.vocab_size, teacher.vocab_size
        ));
    }
    if layers.len() != student.num_hidden_layers {
        return Err(format!(
            "student.teacher_layers lists {} layers; the student has {}",
            layers.len(),
            student.num_hidden_layers
        ));
    }
    if let Some(&out_of_range) = layers
        .iter()
        .find(|&&layer| layer >= teacher.num_hidden_layers)
    {
        return Err(format!(
            "student.teacher_layers names layer {out_of_range}; the teacher has {} (0-based)",
            teacher.num_hidden_layers
        ));
    }
    Ok(())
}

fn group_size(config: &LlamaConfig) -> usize {
    config.num_attention_heads / config.num_key_value_heads
}

/// Whether a student of shape `student` is narrower than its teacher in any width, so that
/// starting it from the teacher needs calibration text to choose what it keeps.
pub fn is_narrower(student: &LlamaConfig, teacher: &LlamaConfig) -> bool {
    student.hidden_size != teacher.hidden_size
        || student.intermediate_size != teacher.intermediate_size
        || student.num_attention_heads != teacher.num_attention_heads
        || student.num_key_value_heads != teacher.num_key_value_heads
}

/// The parts of the teacher a student keeps, each list in the teacher's order.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherSelection {
    /// Residual-stream channels, shared by every layer.
    pub channels: Vec<usize>,
    pub layers: Vec<LayerSelection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerSelection {
    /// The teacher layer this student layer is cut from.
    pub layer: usize,
    /// Query heads, whole key-value groups' worth at a time.
    pub heads: Vec<usize>,
    pub kv_heads: Vec<usize>,
    /// MLP neurons: columns of gate and up, rows of down.
    pub neurons: Vec<usize>,
}

impl TeacherSelection {
    /// Everything of `layers`: a student of the teacher's widths.
    fn whole(teacher: &LlamaConfig, layers: &[usize]) -> Self {
        Self {
            channels: (0..teacher.hidden_size).collect(),
            layers: layers
                .iter()
                .map(|&layer| LayerSelection {
                    layer,
                    heads: (0..teacher.num_attention_heads).collect(),
                    kv_heads: (0..teacher.num_key_value_heads).collect(),
                    neurons: (0..teacher.intermediate_size).collect(),
                })
                .collect(),
        }
    }
}

/// How much the teacher uses each of its units on calibration text: mean magnitudes of
/// activations, as Minitron (Muralidharan et al. 2024) ranks what to prune.
struct Importance {
    /// Mean |x| of every normalized input (both norms of each layer and the final norm).
    channels: Vec<f64>,
    /// Per layer: mean L2 norm of each head's attention output.
    heads: Vec<Vec<f64>>,
    /// Per layer: mean |silu(gate) * up| of each neuron.
    neurons: Vec<Vec<f64>>,
}

/// The teacher's forward pass over `windows` (each `seq_len` tokens, run a few at a time),
/// reading what each unit carries where the next matrices read it.
fn measure_importance(teacher: &Llama, windows: &[u32], seq_len: usize) -> Importance {
    const WINDOWS_PER_PASS: usize = 4;
    let config = teacher.config();
    let device = teacher.device();
    let heads = config.num_attention_heads;
    let mut importance = Importance {
        channels: vec![0.0; config.hidden_size],
        heads: vec![vec![0.0; heads]; config.num_hidden_layers],
        neurons: vec![vec![0.0; config.intermediate_size]; config.num_hidden_layers],
    };
    let positions = windows.len();
    for chunk in windows.chunks(WINDOWS_PER_PASS * seq_len) {
        let mut x = teacher.embed(token_windows(chunk, seq_len, &device));
        for (index, layer) in teacher.layers.iter().enumerate() {
            let mut progress = layer.begin(x);
            while let Some(group) = LayerMatrix::SEQUENTIAL_GROUPS.get(progress.group()) {
                let input = progress.input().clone();
                match group[0] {
                    LayerMatrix::Query | LayerMatrix::Gate => {
                        accumulate(&mut importance.channels, magnitude_sums(input), positions)
                    }
                    LayerMatrix::Output => accumulate(
                        &mut importance.heads[index],
                        head_norm_sums(input, heads),
                        positions,
                    ),
                    LayerMatrix::Down => accumulate(
                        &mut importance.neurons[index],
                        magnitude_sums(input),
                        positions,
                    ),
                    LayerMatrix::Key | LayerMatrix::Value | LayerMatrix::Up => {
                        unreachable!("a group starts with q, o, gate or down")
                    }
                }
                progress = layer.advance(progress, teacher.rotary_tables());
            }
            x = progress.output();
        }
        accumulate(
            &mut importance.channels,
            magnitude_sums(teacher.final_norm(x)),
            positions,
        );
    }
    importance
}

/// Sums of |x| over every position of `[batch, seq, features]`, one per feature.
fn magnitude_sums(x: Tensor<3>) -> Vec<f32> {
    let [batch, seq, features] = x.dims();
    floats(x.abs().reshape([batch * seq, features]).sum_dim(0))
}

/// Sums over every position of each head's L2 norm, from `[batch, seq, heads * head_dim]`.
fn head_norm_sums(x: Tensor<3>, heads: usize) -> Vec<f32> {
    let [batch, seq, width] = x.dims();
    floats(
        x.reshape([batch * seq, heads, width / heads])
            .powi_scalar(2)
            .sum_dim(2)
            .sqrt()
            .sum_dim(0),
    )
}

fn floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec()
        .expect("activations are f32")
}

fn accumulate(totals: &mut [f64], sums: Vec<f32>, positions: usize) {
    for (total, sum) in totals.iter_mut().zip(sums) {
        *total += f64::from(sum) / positions as f64;
    }
}

/// The `count` highest-scoring indices, in index order; ties keep the lower index.
fn top_indices(scores: &[f64], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = order[..count].to_vec();
    kept.sort_unstable();
    kept
}

/// How a student starts from its teacher: the layers it takes and, when it is narrower, the
/// text that ranks the teacher's units.
#[derive(Debug, Clone)]
pub struct TeacherStart {
    /// Checked with [`check_from_teacher`].
    pub layers: Vec<usize>,
    /// Training windows of `seq_len` tokens each, empty for a student of the teacher's widths.
    pub calibration: Vec<u32>,
    pub seq_len: usize,
}

impl TeacherStart {
    /// Calibration windows a narrower student's units are ranked on: at 256 tokens each, 8,192
    /// positions of the teacher's forward pass, once, before the first step.
    pub const CALIBRATION_WINDOWS: usize = 32;

    /// The run log's account of the start.
    pub fn describe(&self) -> String {
        let mut text = format!("; student starts from teacher layers {:?}", self.layers);
        if !self.calibration.is_empty() {
            text += &format!(
                ", cut to its widths by the teacher's mean activations on {} training windows",
                self.calibration.len() / self.seq_len
            );
        }
        text
    }
}

/// What a student of shape `student` keeps of the teacher: all of `start.layers` at the
/// teacher's widths; otherwise the units the teacher uses most over `start.calibration`.
/// Key-value groups rank by the sum of their query heads, and each kept group keeps its
/// strongest query heads.
pub fn select_from_teacher(
    student: &LlamaConfig,
    teacher: &Llama,
    start: &TeacherStart,
) -> TeacherSelection {
    let shape = teacher.config();
    let layers = &start.layers;
    if !is_narrower(student, shape) {
        return TeacherSelection::whole(shape, layers);
    }
    let importance = measure_importance(teacher, &start.calibration, start.seq_len);
    let (teacher_group, student_group) = (group_size(shape), group_size(student));
    TeacherSelection {
        channels: top_indices(&importance.channels, student.hidden_size),
        layers: layers
            .iter()
            .map(|&layer| {
                let heads = &importance.heads[layer];
                let group_scores: Vec<f64> = heads
                    .chunks(teacher_group)
                    .map(|group| group.iter().sum())
                    .collect();
                let kv_heads = top_indices(&group_scores, student.num_key_value_heads);
                let heads = kv_heads
                    .iter()
                    .flat_map(|&group| {
                        let first = group * teacher_group;
                        top_indices(&heads[first..first + teacher_group], student_group)
                            .into_iter()
                            .map(move |head| first + head)
                    })
                    .collect();
                LayerSelection {
                    layer,
                    heads,
                    kv_heads,
                    neurons: top_indices(&importance.neurons[layer], student.intermediate_size),
                }
            })
            .collect(),
    }
}

/// `student` with the teacher's embeddings, norms, output head and layers, cut to `selection`
/// (from [`select_from_teacher`]). Vocabulary rows beyond the student's are dropped.
pub fn student_from_teacher(
    mut student: Llama,
    teacher: &Llama,
    selection: &TeacherSelection,
) -> Llama {
    let device = student.device();
    let vocab = student.config().vocab_size;
    let head_dim = teacher.config().head_dim();
    let channels = indices(&selection.channels, &device);
    let embedding = float_param(teacher.embedding()).val().to_device(&device);
    let hidden = embedding.dims()[1];
    student.set_embedding(Param::from_tensor(
        embedding
            .slice([0..vocab, 0..hidden])
            .select(1, channels.clone()),
    ));
    for (layer, kept) in student.layers.iter_mut().zip(&selection.layers) {
        let source = &teacher.layers[kept.layer];
        let query = indices(&head_columns(&kept.heads, head_dim), &device);
        let key_value = indices(&head_columns(&kept.kv_heads, head_dim), &device);
        let neurons = indices(&kept.neurons, &device);
        for matrix in LayerMatrix::ALL {
            let (rows, columns) = match matrix {
                LayerMatrix::Query => (&channels, &query),
                LayerMatrix::Key | LayerMatrix::Value => (&channels, &key_value),
                LayerMatrix::Output => (&query, &channels),
                LayerMatrix::Gate | LayerMatrix::Up => (&channels, &neurons),
                LayerMatrix::Down => (&neurons, &channels),
            };
            let weight = float_param(source.matrix(matrix).float_weight()).val();
            *layer.matrix_mut(matrix) = Linear::new(Param::from_tensor(
                weight
                    .to_device(&device)
                    .select(0, rows.clone())
                    .select(1, columns.clone()),
            ));
        }
        layer.input_layernorm.gamma = kept_gains(&source.input_layernorm.gamma, &channels);
        layer.post_attention_layernorm.gamma =
            kept_gains(&source.post_attention_layernorm.gamma, &channels);
    }
    student.norm.gamma = kept_gains(&teacher.norm.gamma, &channels);
    if let (Some(head), Some(teacher_head)) = (&mut student.lm_head, &teacher.lm_head) {
        let weight = float_param(teacher_head.float_weight())
            .val()
            .to_device(&device);
        *head = Linear::new(Param::from_tensor(
            weight
                .slice([0..hidden, 0..vocab])
                .select(0, channels.clone()),
        ));
    }
    student
}

/// The columns of a `[_, heads * head_dim]` projection that belong to `heads`.
fn head_columns(heads: &[usize], head_dim: usize) -> Vec<usize> {
    heads
        .iter()
        .flat_map(|&head| head * head_dim..(head + 1) * head_dim)
        .collect()
}

fn indices(values: &[usize], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(
        TensorData::new(
            values.iter().map(|&value| value as i64).collect::<Vec<_>>(),
            [values.len()],
        ),
        device,
    )
}

fn kept_gains(gamma: &Param<Tensor<1>>, channels: &Tensor<1, Int>) -> Param<Tensor<1>> {
    Param::from_tensor(
        gamma
            .val()
            .to_device(&channels.device())
            .select(0, channels.clone()),
    )
}

/// Teachers load from training checkpoints and Hugging Face folders, which hold float weights.
fn float_param(param: Option<&Param<Tensor<2>>>) -> &Param<Tensor<2>> {
    param.expect("teachers are float models")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(layers: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }

    fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
        tensor.into_data().try_into_vec().unwrap()
    }

    #[test]
    fn default_layers_are_evenly_spaced() {
        assert_eq!(default_teacher_layers(4, 2), vec![0, 2]);
        assert_eq!(default_teacher_layers(6, 3), vec![0, 2, 4]);
        assert_eq!(default_teacher_layers(4, 4), vec![0, 1, 2, 3]);
    }

    fn tokens(count: usize) -> Vec<u32> {
        (0..count)
            .map(|index| ((index * 7 + 3) % 64) as u32)
            .collect()
    }

    fn copy_of(teacher: &Llama, student: Llama, layers: &[usize], seq_len: usize) -> Llama {
        let start = TeacherStart {
            layers: layers.to_vec(),
            calibration: if is_narrower(student.config(), teacher.config()) {
                tokens(2 * seq_len)
            } else {
                Vec::new()
            },
            seq_len,
        };
        let selection = select_from_teacher(student.config(), teacher, &start);
        student_from_teacher(student, teacher, &selection)
    }

    fn forward_values(model: &Llama, device: &Device) -> Vec<f32> {
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 9, 27, 5], [1, 4]), device);
        values(model.forward(tokens))
    }

    fn assert_close(got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(expected) {
            assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        }
    }

    /// Multiplies the columns of `linear`'s `[in, out]` weight by `scale(column)`.
    fn scale_columns(linear: &mut Linear, scale: impl Fn(usize) -> f32) {
        let weight = linear.float_weight().unwrap().val();
        let [inputs, outputs] = weight.dims();
        let mask: Vec<f32> = (0..inputs * outputs)
            .map(|index| scale(index % outputs))
            .collect();
        let mask =
            Tensor::<2>::from_data(TensorData::new(mask, [inputs, outputs]), &weight.device());
        *linear = Linear::new(Param::from_tensor(weight * mask));
    }

    fn gains(values: Vec<f32>, device: &Device) -> Param<Tensor<1>> {
        let count = values.len();
        Param::from_tensor(Tensor::from_data(TensorData::new(values, [count]), device))
    }

    #[test]
    fn copied_student_computes_what_the_chosen_teacher_layers_compute() {
        let device = Device::flex();
        let teacher = Llama::new(&shape(4), 0.0, 1, &device).unwrap();
        let student = Llama::new(&shape(2), 0.0, 2, &device).unwrap();
        check_from_teacher(student.config(), teacher.config(), &[1, 3]).unwrap();
        let student = copy_of(&teacher, student, &[1, 3], 4);
        assert_eq!(student.embedding_values(), teacher.embedding_values());
        assert_eq!(
            student.layers[1].self_attn.q_proj.weight_out_in(),
            teacher.layers[3].self_attn.q_proj.weight_out_in()
        );
        assert_eq!(
            student.lm_head.as_ref().unwrap().weight_out_in(),
            teacher.lm_head.as_ref().unwrap().weight_out_in()
        );

        let mut pruned_teacher = teacher.clone();
        pruned_teacher.layers = vec![teacher.layers[1].clone(), teacher.layers[3].clone()];
        assert_close(
            &forward_values(&student, &device),
            &forward_values(&pruned_teacher, &device),
        );
    }

    /// A teacher of 4 heads in 2 key-value groups whose odd residual channels, second
    /// key-value group (and so heads 2 and 3) and every fourth MLP neuron carry nothing.
    fn teacher_with_idle_units(device: &Device) -> Llama {
        let mut config = shape(2);
        config.num_attention_heads = 4;
        config.num_key_value_heads = 2;
        let mut teacher = Llama::new(&config, 0.0, 3, device).unwrap();
        let even_channels: Vec<f32> = (0..16).map(|channel| ((channel + 1) % 2) as f32).collect();
        for layer in &mut teacher.layers {
            layer.input_layernorm.gamma = gains(even_channels.clone(), device);
            layer.post_attention_layernorm.gamma = gains(even_channels.clone(), device);
            scale_columns(&mut layer.self_attn.v_proj, |column| f32::from(column < 4));
            scale_columns(&mut layer.mlp.gate_proj, |neuron| {
                f32::from(neuron % 4 != 3)
            });
        }
        teacher.norm.gamma = gains(even_channels, device);
        teacher
    }

    #[test]
    fn a_narrower_student_keeps_the_units_its_teacher_uses() {
        let device = Device::flex();
        let teacher = teacher_with_idle_units(&device);
        let mut narrow = shape(1);
        narrow.hidden_size = 8;
        narrow.intermediate_size = 24;
        narrow.num_attention_heads = 2;
        narrow.num_key_value_heads = 1;
        check_from_teacher(&narrow, teacher.config(), &[1]).unwrap();
        let start = TeacherStart {
            layers: vec![1],
            calibration: tokens(16),
            seq_len: 8,
        };
        let selection = select_from_teacher(&narrow, &teacher, &start);
        let active_neurons: Vec<usize> = (0..32).filter(|neuron| neuron % 4 != 3).collect();
        assert_eq!(
            selection,
            TeacherSelection {
                channels: vec![0, 2, 4, 6, 8, 10, 12, 14],
                layers: vec![LayerSelection {
                    layer: 1,
                    heads: vec![0, 1],
                    kv_heads: vec![0],
                    neurons: active_neurons.clone(),
                }],
            }
        );

        let student = Llama::new(&narrow, 0.0, 4, &device).unwrap();
        let student = student_from_teacher(student, &teacher, &selection);
        let (kept, source) = (&student.layers[0], &teacher.layers[1]);
        // `weight_out_in` is `[out][in]`: q maps 16 channels to 4 heads of 4, o back.
        let query = source.self_attn.q_proj.weight_out_in();
        let output = source.self_attn.o_proj.weight_out_in();
        let down = source.mlp.down_proj.weight_out_in();
        let student_query = kept.self_attn.q_proj.weight_out_in();
        let student_output = kept.self_attn.o_proj.weight_out_in();
        let student_down = kept.mlp.down_proj.weight_out_in();
        for (out, &teacher_out) in [0usize, 1, 2, 3, 4, 5, 6, 7].iter().enumerate() {
            for (input, &channel) in selection.channels.iter().enumerate() {
                assert_eq!(
                    student_query[out * 8 + input],
                    query[teacher_out * 16 + channel]
                );
                assert_eq!(
                    student_output[input * 8 + out],
                    output[channel * 16 + teacher_out]
                );
            }
        }
        for (input, &neuron) in active_neurons.iter().enumerate() {
            for (out, &channel) in selection.channels.iter().enumerate() {
                assert_eq!(student_down[out * 24 + input], down[channel * 32 + neuron]);
            }
        }
        let embedding = teacher.embedding_values();
        let student_embedding = student.embedding_values();
        for token in 0..64 {
            for (column, &channel) in selection.channels.iter().enumerate() {
                assert_eq!(
                    student_embedding[token * 8 + column],
                    embedding[token * 16 + channel]
                );
            }
        }
        assert_eq!(values(kept.input_layernorm.gamma.val()), vec![1.0; 8]);
        assert_eq!(values(student.norm.gamma.val()), vec![1.0; 8]);
    }

    #[test]
    fn a_student_without_the_idle_neurons_computes_what_its_teacher_computes() {
        let device = Device::flex();
        let mut teacher = Llama::new(&shape(2), 0.0, 5, &device).unwrap();
        for layer in &mut teacher.layers {
            scale_columns(&mut layer.mlp.up_proj, |neuron| f32::from(neuron % 4 != 1));
        }
        let mut narrow = shape(2);
        narrow.intermediate_size = 24;
        let student = Llama::new(&narrow, 0.0, 6, &device).unwrap();
        let student = copy_of(&teacher, student, &[0, 1], 8);
        assert_close(
            &forward_values(&student, &device),
            &forward_values(&teacher, &device),
        );
    }

    #[test]
    fn top_indices_keep_the_highest_scores_in_index_order() {
        assert_eq!(top_indices(&[0.5, 3.0, 1.0, 3.0, 2.0], 3), vec![1, 3, 4]);
        assert_eq!(top_indices(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    }

    #[test]
    fn wider_students_and_other_heads_are_named() {
        let mut student = shape(2);
        student.hidden_size = 32;
        student.intermediate_size = 64;
        let error = check_from_teacher(&student, &shape(4), &[0, 2]).unwrap_err();
        assert!(
            error.contains("hidden_size 32 vs the teacher's 16"),
            "{error}"
        );
        assert!(error.contains("intermediate_size 64"), "{error}");

        let mut student = shape(2);
        student.hidden_size = 8;
        let error = check_from_teacher(&student, &shape(4), &[0, 2]).unwrap_err();
        assert!(error.contains("head width 4"), "{error}");

        let mut student = shape(2);
        student.num_key_value_heads = 1;
        let error = check_from_teacher(&student, &shape(4), &[0, 2]).unwrap_err();
        assert!(
            error.contains("2 query heads per key-value head vs the teacher's 1"),
            "{error}"
        );
    }

    #[test]
    fn layer_lists_are_checked() {
        let error = check_from_teacher(&shape(2), &shape(4), &[0, 4]).unwrap_err();
        assert!(error.contains("names layer 4"), "{error}");
        let error = check_from_teacher(&shape(2), &shape(4), &[0]).unwrap_err();
        assert!(error.contains("lists 1 layers"), "{error}");
    }
}
