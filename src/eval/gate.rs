//! Quality gates: `METRIC OP VALUE`, where VALUE is a number, `base`, or
//! `FACTOR*base` (the first model's value), e.g. `ppl<=1.05*base`.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Le,
    Lt,
    Ge,
    Gt,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rhs {
    Number(f64),
    /// factor × the base model's value
    Base(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub text: String,
    pub metric: String,
    pub op: Op,
    pub rhs: Rhs,
}

#[derive(Debug, thiserror::Error)]
#[error("--gate '{text}': {msg} (expected METRIC OP VALUE, e.g. 'ppl<=1.05*base')")]
pub struct GateError {
    pub text: String,
    pub msg: String,
}

impl Gate {
    pub fn parse(text: &str, metrics: &[&str]) -> Result<Self, GateError> {
        let err = |msg: String| GateError {
            text: text.into(),
            msg,
        };
        let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (pos, op, len) = ["<=", ">=", "<", ">"]
            .iter()
            .find_map(|o| t.find(o).map(|p| (p, *o, o.len())))
            .ok_or_else(|| err("no comparison operator".into()))?;
        let metric = t[..pos].to_string();
        if !metrics.contains(&metric.as_str()) {
            return Err(err(format!(
                "unknown metric `{metric}` (known: {})",
                metrics.join(", ")
            )));
        }
        let op = match op {
            "<=" => Op::Le,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            _ => Op::Gt,
        };
        let rhs_text = &t[pos + len..];
        let rhs = if rhs_text == "base" {
            Rhs::Base(1.0)
        } else if let Some(f) = rhs_text.strip_suffix("*base") {
            Rhs::Base(
                f.parse()
                    .map_err(|_| err(format!("`{f}` is not a number")))?,
            )
        } else {
            Rhs::Number(
                rhs_text
                    .parse()
                    .map_err(|_| err(format!("`{rhs_text}` is not a number or FACTOR*base")))?,
            )
        };
        Ok(Self {
            text: text.into(),
            metric,
            op,
            rhs,
        })
    }

    pub fn needs_base(&self) -> bool {
        matches!(self.rhs, Rhs::Base(_))
    }

    /// The threshold and whether `value` passes it.
    pub fn check(&self, value: f64, base: Option<f64>) -> Option<(f64, bool)> {
        let limit = match self.rhs {
            Rhs::Number(x) => x,
            Rhs::Base(f) => f * base?,
        };
        let pass = match self.op {
            Op::Le => value <= limit,
            Op::Lt => value < limit,
            Op::Ge => value >= limit,
            Op::Gt => value > limit,
        };
        Some((limit, pass))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let g = Gate::parse("ppl <= 1.05*base", &["ppl"]).unwrap();
        assert_eq!(g.check(10.4, Some(10.0)), Some((10.5, true)));
        assert_eq!(g.check(10.6, Some(10.0)).map(|c| c.1), Some(false));
        let g = Gate::parse("ppl<12", &["ppl"]).unwrap();
        assert_eq!(g.check(12.0, None).map(|c| c.1), Some(false));
        assert!(Gate::parse("pl<=base", &["ppl"])
            .unwrap_err()
            .to_string()
            .contains("unknown metric"));
        assert!(Gate::parse("ppl=3", &["ppl"]).is_err());
        assert!(Gate::parse("ppl<=x*base", &["ppl"]).is_err());
    }
}
