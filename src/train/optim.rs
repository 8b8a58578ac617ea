//! AdamW (Loshchilov & Hutter, arXiv 1711.05101) exactly as
//! `torch.optim.AdamW`'s single-tensor path computes it: decoupled weight
//! decay, then the Adam moments with bias correction. State is plain tensors
//! so a checkpoint can save and restore it bit for bit.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// (name, parameter) pairs; the optimizer sees nothing else.
    params: Vec<(String, Tensor)>,
    /// First and second moments, one pair per parameter.
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        Self {
            config,
            exp_avg: params.iter().map(|(_, p)| zeros(p)).collect(),
            exp_avg_sq: params.iter().map(|(_, p)| zeros(p)).collect(),
            params,
            step: 0,
        }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// L2 norm of all gradients together (torch's `clip_grad_norm_` total norm).
    pub fn grad_norm(&self) -> f64 {
        let sq: f64 = self
            .params
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() {
                    g.norm().double_value(&[]).powi(2)
                } else {
                    0.0
                }
            })
            .sum();
        sq.sqrt()
    }

    /// Scales gradients so their total norm is at most `max_norm`, as
    /// `clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, capped at 1).
    pub fn clip_grad_norm(&self, max_norm: f64, total_norm: f64) {
        let coef = (max_norm / (total_norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            tch::no_grad(|| {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.f_mul_scalar_(coef);
                    }
                }
            });
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig {
            betas: (beta1, beta2),
            eps,
            weight_decay,
        } = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter().enumerate() {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * weight_decay);
                }
                let m = &mut self.exp_avg[i];
                let _ = m.f_lerp_(&grad, 1.0 - beta1);
                let v = &mut self.exp_avg_sq[i];
                let _ = v.f_mul_scalar_(beta2);
                let _ = v.f_add_(&(grad.square() * (1.0 - beta2)));
                let denom = v.sqrt() / bias_correction2_sqrt + eps;
                let _ = p.f_sub_(&(&*m / denom * step_size));
            }
        });
    }

    /// State tensors named `{param}.exp_avg` / `{param}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].shallow_clone()));
            out.push((
                format!("{name}.exp_avg_sq"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        out
    }

    /// Restores the moments written by `state_tensors` (`get` returns a saved tensor by name).
    pub fn load_state(
        &mut self,
        step: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{name}.{suffix}");
                let t = get(&key).ok_or_else(|| format!("optimizer state `{key}` is missing"))?;
                if t.size() != p.size() {
                    return Err(format!("optimizer state `{key}` has shape {:?}", t.size()));
                }
                *slot = t.to_kind(Kind::Float).to_device(p.device()).detach();
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The first AdamW step moves every weight by about lr·sign(grad) (plus decay).
    #[test]
    fn first_step_is_sign_like_with_decoupled_decay() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[3.0f32, -1.0, 0.0])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.1,
            },
        );
        opt.step(0.01);
        let got: Vec<f32> = Vec::try_from(p.detach().to_device(Device::Cpu)).unwrap();
        let decayed = [1.0 * 0.999, -2.0 * 0.999, 0.5 * 0.999];
        assert!((got[0] - (decayed[0] - 0.01)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (decayed[1] + 0.01)).abs() < 1e-6, "{got:?}");
        assert!((got[2] - decayed[2]).abs() < 1e-6, "{got:?}");
        assert_eq!(opt.state_tensors().len(), 2);
    }
}
