//! AdamW (Loshchilov & Hutter 2019) with global-norm gradient clipping.
//!
//! The moments are keyed by parameter path (`layers.0.mlp.up_proj.weight`), not by burn's
//! random parameter ids, and saved in burnpack with those names: a resumed run finds every
//! moment of every parameter, and a missing or misshapen one is an error instead of a silent
//! restart from zero.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use distillery_kernels::AdamWStep;
use distillery_run::CheckpointError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Debug, Clone)]
struct Moments {
    first: Tensor<1>,
    second: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    settings: AdamWSettings,
    /// Updates applied so far (for bias correction).
    steps: u64,
    moments: BTreeMap<String, Moments>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update to every parameter that has a gradient in `grads`.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: &mut GradientsParams,
        lr: f64,
        clip_norm: Option<f64>,
    ) -> (M, UpdateStats) {
        let mut norm = GradNorm {
            grads,
            sum_of_squares: None,
        };
        module.visit(&mut norm);
        let grad_norm = norm
            .sum_of_squares
            .map_or(0.0, |total| f64::from(total.into_scalar::<f32>()).sqrt());
        let grad_scale = match clip_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let mut update = Update {
            optimizer: self,
            grads,
            lr,
            grad_scale,
            path: Vec::new(),
        };
        let module = module.map(&mut update);
        (module, UpdateStats { grad_norm })
    }

    /// Writes the moments and step count to a burnpack file.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let mut tensors = Vec::with_capacity(2 * self.moments.len());
        for (name, moments) in &self.moments {
            for (suffix, tensor) in [("first", &moments.first), ("second", &moments.second)] {
                let data = tensor.to_data();
                tensors.push(burn_pack::Tensor::new(
                    format!("{name}.{suffix}"),
                    data.dtype(),
                    data.shape().clone(),
                    None,
                    data.into_bytes(),
                ));
            }
        }
        burn_pack::Writer::new(tensors)
            .with_scalar("steps", burn_pack::Scalar::from(self.steps))
            .overwrite(true)
            .write_to_file(path)
            .map_err(|error| CheckpointError::file(path, error.to_string()))
    }

    /// Reads moments saved by [`save`](Self::save) onto `device`, checking that they cover
    /// exactly the parameters of `module`, with the same sizes.
    pub fn load<M: Module>(
        settings: AdamWSettings,
        path: &Path,
        module: &M,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        let fail = |message: String| CheckpointError::file(path, message);
        let reader =
            burn_pack::Reader::from_file_exact(path).map_err(|error| fail(error.to_string()))?;
        let steps = reader
            .scalars()
            .get("steps")
            .and_then(|scalar| u64::try_from(*scalar).ok())
            .ok_or_else(|| fail("has no `steps` scalar".into()))?;
        let mut stored = BTreeMap::new();
        for tensor in reader
            .into_tensors()
            .map_err(|error| fail(error.to_string()))?
        {
            let (name, dtype, shape, _, bytes) = tensor
                .into_parts()
                .map_err(|error| fail(error.to_string()))?;
            if dtype != DType::F32 || shape.num_dims() != 1 {
                return Err(fail(format!("tensor `{name}` is not a 1-D f32 tensor")));
            }
            stored.insert(name, TensorData::from_bytes(bytes, shape, dtype));
        }

        // An optimizer that never stepped holds no moments (an imported model's step 0).
        if steps == 0 && stored.is_empty() {
            return Ok(Self::new(settings));
        }
        let mut expected = ParameterSizes::default();
        module.visit(&mut expected);
        let mut moments = BTreeMap::new();
        for (name, size) in expected.sizes {
            let mut take = |suffix: &str| {
                let key = format!("{name}.{suffix}");
                let data = stored
                    .remove(&key)
                    .ok_or_else(|| fail(format!("has no moment `{key}`")))?;
                if data.shape().num_elements() != size {
                    return Err(fail(format!(
                        "moment `{key}` has {} values, the parameter has {size}",
                        data.shape().num_elements()
                    )));
                }
                // f32 whatever the run's precision, as `map_float` keeps them.
                Ok(Tensor::<1>::from_data(data, (device, DType::F32)))
            };
            let first = take("first")?;
            let second = take("second")?;
            moments.insert(name, Moments { first, second });
        }
        if let Some(extra) = stored.keys().next() {
            return Err(fail(format!(
                "holds moment `{extra}` for a parameter the model does not have"
            )));
        }
        Ok(Self {
            settings,
            steps,
            moments,
        })
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum_of_squares: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let squares = grad.square().sum();
            self.sum_of_squares = Some(match self.sum_of_squares.take() {
                Some(total) => total + squares,
                None => squares,
            });
        }
    }
}

#[derive(Default)]
struct ParameterSizes {
    path: Vec<String>,
    sizes: BTreeMap<String, usize>,
}

impl ModuleVisitor for ParameterSizes {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.sizes
            .insert(self.path.join("."), param.shape().num_elements());
    }
}

struct Update<'a> {
    optimizer: &'a mut AdamW,
    grads: &'a mut GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let AdamWSettings {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.optimizer.settings;
        let shape = tensor.shape();
        let size = shape.num_elements();
        let require_grad = tensor.is_require_grad();
        let name = self.path.join(".");
        let (first, second) = match self.optimizer.moments.remove(&name) {
            Some(Moments { first, second }) => (first, second),
            None => {
                let zeros = Tensor::<1>::zeros([size], (&grad.device(), DType::F32));
                (zeros.clone(), zeros)
            }
        };
        let steps = self.optimizer.steps as i32;
        // Decay matrices only: shrinking norm gains toward zero fights the normalization.
        let decay = if D >= 2 {
            1.0 - self.lr * weight_decay
        } else {
            1.0
        };
        let step = AdamWStep {
            lr: self.lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            decay: decay as f32,
            first_correction: (1.0 - beta1.powi(steps)) as f32,
            second_correction: (1.0 - beta2.powi(steps)) as f32,
            grad_scale: self.grad_scale as f32,
        };
        // A half-precision run steps in f32 with f32 moments, as mixed-precision AdamW does:
        // in f16, eps (1e-8) and most squared gradients round to zero.
        let dtype = tensor.dtype();
        let in_f32 = |tensor: Tensor<1>| match tensor.dtype() {
            DType::F32 => tensor,
            _ => tensor.cast(FloatDType::F32),
        };
        let (value, first, second) = distillery_kernels::adamw(
            in_f32(tensor.inner().reshape([size])),
            in_f32(grad.reshape([size])),
            first,
            second,
            step,
        );
        let value = match dtype {
            DType::F32 => value,
            _ => value.cast(dtype),
        };
        self.optimizer
            .moments
            .insert(name, Moments { first, second });
        let mut value = Tensor::from_inner(value.reshape(shape));
        if require_grad {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::tensor::Device;

    use super::*;

    #[derive(Module, Debug)]
    struct Pair {
        matrix: Param<Tensor<2>>,
        gain: Param<Tensor<1>>,
    }

    const SETTINGS: AdamWSettings = AdamWSettings {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    fn pair(device: &Device) -> Pair {
        Pair {
            matrix: Param::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2]), device),
            gain: Param::from_data(TensorData::new(vec![0.5f32], [1]), device),
        }
    }

    /// Gradients of `sum(matrix * (3, 4)) + gain * 5`: (3, 4) and 5.
    fn grads(model: &Pair) -> GradientsParams {
        let device = model.matrix.device();
        let weights = Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 4.0], [1, 2]), &device);
        let loss = (model.matrix.val() * weights).sum() + model.gain.val().mul_scalar(5.0).sum();
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn values<const D: usize>(param: &Param<Tensor<D>>) -> Vec<f32> {
        param.val().into_data().try_into_vec().unwrap()
    }

    #[test]
    fn two_steps_match_hand_computed_adamw() {
        let device = Device::flex().autodiff();
        let mut model = pair(&device);
        let mut optimizer = AdamW::new(SETTINGS);
        let lr = 0.01;
        for _ in 0..2 {
            let mut gradients = grads(&model);
            model = optimizer.step(model, &mut gradients, lr, None).0;
        }
        // A constant gradient g gives m_hat = g and v_hat = g^2 at every step, so each step
        // moves by lr * g / (|g| + eps) = lr * sign(g), after decaying matrices by (1 - lr*wd).
        let expected = |start: f64, decays: bool| {
            let mut value = start;
            for _ in 0..2 {
                if decays {
                    value *= 1.0 - lr * 0.1;
                }
                value -= lr;
            }
            value as f32
        };
        let matrix = values(&model.matrix);
        assert!((matrix[0] - expected(1.0, true)).abs() < 1e-6, "{matrix:?}");
        assert!(
            (matrix[1] - expected(-2.0, true)).abs() < 1e-6,
            "{matrix:?}"
        );
        let gain = values(&model.gain);
        assert!((gain[0] - expected(0.5, false)).abs() < 1e-6, "{gain:?}");
        assert_eq!(optimizer.steps(), 2);
    }

    #[test]
    fn half_precision_parameters_step_in_f32_with_f32_moments() {
        let device = Device::flex().autodiff();
        let half = (&device, DType::F16);
        let mut model = Pair {
            matrix: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, -2.0], [1, 2]),
                half,
            )),
            gain: Param::from_tensor(Tensor::from_data(TensorData::new(vec![0.5f32], [1]), half)),
        };
        assert_eq!(model.matrix.val().dtype(), DType::F16);
        // Gradients of 1e-4: their squares (1e-8) and eps round to zero in f16, where the
        // update would be 0 / 0.
        let weights = Tensor::<2>::from_data(TensorData::new(vec![1e-4f32, -1e-4], [1, 2]), half);
        let loss = (model.matrix.val() * weights).sum() + model.gain.val().mul_scalar(1e-4).sum();
        let mut gradients = GradientsParams::from_grads(loss.backward(), &model);
        let mut optimizer = AdamW::new(AdamWSettings {
            weight_decay: 0.0,
            ..SETTINGS
        });
        model = optimizer.step(model, &mut gradients, 0.01, None).0;
        assert_eq!(model.matrix.val().dtype(), DType::F16);
        assert_eq!(optimizer.moments["matrix"].second.dtype(), DType::F32);
        // Each parameter moves by lr * sign(g), to f16's precision (a step of ~1e-3 at 1).
        let as_f32 = |tensor: Tensor<1>| -> Vec<f32> {
            tensor.into_data().convert::<f32>().try_into_vec().unwrap()
        };
        let moved = [
            as_f32(model.matrix.val().reshape([2])),
            as_f32(model.gain.val()),
        ]
        .concat();
        for (value, expected) in moved.iter().zip([0.99f32, -1.99, 0.49]) {
            assert!((value - expected).abs() < 2e-3, "{moved:?}");
        }
    }

    #[test]
    fn global_norm_is_reported_and_clipping_scales_every_gradient() {
        let device = Device::flex().autodiff();
        let settings = AdamWSettings {
            weight_decay: 0.0,
            ..SETTINGS
        };
        let mut optimizer = AdamW::new(settings);
        let model = pair(&device);
        let mut gradients = grads(&model);
        let (_, stats) = optimizer.step(model, &mut gradients, 0.01, Some(1.0));
        // |(3, 4, 5)| = sqrt(50).
        assert!((stats.grad_norm - 50f64.sqrt()).abs() < 1e-5);
        // After clipping, the first moment holds (1 - beta1) * g * (1 / sqrt(50)).
        let first: Vec<f32> = optimizer.moments["gain"]
            .first
            .clone()
            .into_data()
            .try_into_vec()
            .unwrap();
        let expected = 0.1 * 5.0 / 50f64.sqrt();
        assert!((first[0] as f64 - expected).abs() < 1e-6, "{first:?}");
    }

    #[test]
    fn saved_state_resumes_bit_identically() {
        let device = Device::flex().autodiff();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.bpk");

        let mut model = pair(&device);
        let mut optimizer = AdamW::new(SETTINGS);
        let mut gradients = grads(&model);
        model = optimizer.step(model, &mut gradients, 0.01, None).0;
        optimizer.save(&path).unwrap();
        let mut restored = AdamW::load(SETTINGS, &path, &model, &device).unwrap();
        assert_eq!(restored.steps(), 1);

        let mut continued = model.clone();
        let mut gradients = grads(&model);
        model = optimizer.step(model, &mut gradients, 0.01, None).0;
        let mut gradients = grads(&continued);
        continued = restored.step(continued, &mut gradients, 0.01, None).0;
        assert_eq!(values(&model.matrix), values(&continued.matrix));
        assert_eq!(values(&model.gain), values(&continued.gain));
    }

    #[test]
    fn state_of_another_model_is_refused() {
        let device = Device::flex().autodiff();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.bpk");
        let model = pair(&device);
        let mut optimizer = AdamW::new(SETTINGS);
        let mut gradients = grads(&model);
        let model = optimizer.step(model, &mut gradients, 0.01, None).0;
        optimizer.save(&path).unwrap();

        let wider = Pair {
            matrix: Param::from_data(TensorData::new(vec![0.0f32; 3], [1, 3]), &device),
            gain: model.gain.clone(),
        };
        let error = AdamW::load(SETTINGS, &path, &wider, &device)
            .unwrap_err()
            .to_string();
        assert!(error.contains("matrix.first"), "{error}");
        assert!(error.contains("optimizer.bpk"), "{error}");

        std::fs::write(&path, b"not a burnpack file").unwrap();
        let error = AdamW::load(SETTINGS, &path, &model, &device)
            .unwrap_err()
            .to_string();
        assert!(error.contains("optimizer.bpk"), "{error}");
    }
}
