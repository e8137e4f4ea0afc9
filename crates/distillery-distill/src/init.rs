//! Starting a student from its teacher's weights (DistilBERT-style): embeddings, final norm,
//! output head and a chosen subset of the teacher's decoder layers.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use distillery_model::{Linear, Llama, LlamaConfig};

/// The teacher layers a student of `student_layers` layers takes by default: evenly spaced,
/// starting at the first (every other layer when the student has half as many).
pub fn default_teacher_layers(teacher_layers: usize, student_layers: usize) -> Vec<usize> {
    (0..student_layers)
        .map(|index| index * teacher_layers / student_layers)
        .collect()
}

/// Checks that a student of shape `student` can take `layers` from a teacher of shape
/// `teacher`; the error names what differs.
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
    let differences: Vec<String> = widths
        .iter()
        .filter(|(_, student, teacher)| student != teacher)
        .map(|(field, student, teacher)| format!("{field} {student} vs the teacher's {teacher}"))
        .collect();
    if !differences.is_empty() {
        return Err(format!(
            "student.init = \"from_teacher\" needs the teacher's widths: {}",
            differences.join(", ")
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

/// `student` with the teacher's embeddings, final norm, output head and `layers` (already
/// checked with [`check_from_teacher`]). Vocabulary rows beyond the student's are dropped.
pub fn student_from_teacher(mut student: Llama, teacher: &Llama, layers: &[usize]) -> Llama {
    let device = student.device();
    let vocab = student.config().vocab_size;
    let embedding = float_param(teacher.embedding()).val();
    let hidden = embedding.dims()[1];
    student.set_embedding(fresh(embedding.slice([0..vocab, 0..hidden]), &device));
    student.layers = layers
        .iter()
        .map(|&index| teacher.layers[index].clone().to_device(&device))
        .collect();
    student.norm = teacher.norm.clone().to_device(&device);
    if let (Some(head), Some(teacher_head)) = (&mut student.lm_head, &teacher.lm_head) {
        let weight = float_param(teacher_head.float_weight()).val();
        *head = Linear::new(fresh(weight.slice([0..hidden, 0..vocab]), &device));
    }
    student
}

/// Teachers load from training checkpoints and Hugging Face folders, which hold float weights.
fn float_param(param: Option<&Param<Tensor<2>>>) -> &Param<Tensor<2>> {
    param.expect("teachers are float models")
}

/// A new trainable parameter holding a copy of `value`.
fn fresh<const D: usize>(value: Tensor<D>, device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(value.to_device(device))
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

    #[test]
    fn copied_student_computes_what_the_chosen_teacher_layers_compute() {
        let device = Device::flex();
        let teacher = Llama::new(&shape(4), 0.0, 1, &device).unwrap();
        let student = Llama::new(&shape(2), 0.0, 2, &device).unwrap();
        check_from_teacher(student.config(), teacher.config(), &[1, 3]).unwrap();
        let student = student_from_teacher(student, &teacher, &[1, 3]);
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
        let tokens = Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(vec![3i64, 9, 27, 5], [1, 4]),
            &device,
        );
        let expected = values(pruned_teacher.forward(tokens.clone()));
        let got = values(student.forward(tokens));
        for (got, expected) in got.iter().zip(&expected) {
            assert!((got - expected).abs() < 1e-5);
        }
    }

    #[test]
    fn mismatched_widths_are_named() {
        let mut student = shape(2);
        student.hidden_size = 8;
        student.intermediate_size = 16;
        let error = check_from_teacher(&student, &shape(4), &[0, 2]).unwrap_err();
        assert!(
            error.contains("hidden_size 8 vs the teacher's 16"),
            "{error}"
        );
        assert!(error.contains("intermediate_size 16"), "{error}");
    }

    #[test]
    fn layer_lists_are_checked() {
        let error = check_from_teacher(&shape(2), &shape(4), &[0, 4]).unwrap_err();
        assert!(error.contains("names layer 4"), "{error}");
        let error = check_from_teacher(&shape(2), &shape(4), &[0]).unwrap_err();
        assert!(error.contains("lists 1 layers"), "{error}");
    }
}
