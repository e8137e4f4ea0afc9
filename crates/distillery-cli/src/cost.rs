//! `distillery cost`: what serving a model costs on hardware rented by the hour, against an API
//! priced per token. Pure arithmetic on stated assumptions, each printed with the result; the
//! throughput is given or measured here.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{ConfigArgs, decode_bench, models};

#[derive(clap::Args)]
pub struct CostArgs {
    /// The experiment config; needed with --measure.
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Measure the decode throughput of this model (as `bench generate` does).
    #[arg(long, value_name = "MODEL", conflicts_with = "tokens_per_sec")]
    measure: Option<PathBuf>,
    /// Measure the model decoding with this draft (speculative decoding).
    #[command(flatten)]
    draft: models::DraftArgs,
    /// Measure the model decoding this many prompts as one batch: an instance's total
    /// throughput.
    #[arg(long, requires = "measure")]
    batch: Option<usize>,
    /// Generated tokens per second of one instance, when not measured.
    #[arg(long)]
    tokens_per_sec: Option<f64>,
    /// Rent of one instance per hour.
    #[arg(long)]
    hardware_per_hour: f64,
    /// Share of the time an instance spends generating.
    #[arg(long, default_value_t = 0.5)]
    utilization: f64,
    #[arg(long)]
    tokens_per_day: f64,
    /// The API's price per million generated tokens.
    #[arg(long)]
    api_per_million: f64,
    #[arg(long)]
    json: bool,
}

pub fn run(args: CostArgs) -> anyhow::Result<ExitCode> {
    let (tokens_per_sec, source) = match (args.measure, args.tokens_per_sec) {
        (Some(model), _) => {
            let Some(config) = args.config else {
                anyhow::bail!("--measure needs the experiment config");
            };
            let config = ConfigArgs::new(config, args.overrides).load()?;
            decode_bench::measure_throughput(&config, &model, &args.draft, args.batch)?
        }
        (None, Some(tokens_per_sec)) => {
            anyhow::ensure!(
                args.draft.draft.is_none(),
                "--draft is measured: give --measure MODEL instead of --tokens-per-sec"
            );
            (tokens_per_sec, "given".to_string())
        }
        (None, None) => anyhow::bail!("give --tokens-per-sec, or --measure MODEL"),
    };
    let inputs = CostInputs {
        tokens_per_sec,
        hardware_per_hour: args.hardware_per_hour,
        utilization: args.utilization,
        tokens_per_day: args.tokens_per_day,
        api_per_million: args.api_per_million,
    };
    let estimate = estimate(&inputs).map_err(|message| anyhow::anyhow!(message))?;
    if args.json {
        let report = serde_json::json!({
            "assumptions": inputs,
            "throughput_source": source,
            "estimate": estimate,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", describe(&inputs, &estimate, &source));
    }
    Ok(ExitCode::SUCCESS)
}

/// The assumptions of a cost estimate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CostInputs {
    /// Generated tokens per second of one serving instance.
    pub tokens_per_sec: f64,
    /// Rent of one instance, per hour.
    pub hardware_per_hour: f64,
    /// Share of the time an instance spends generating (batching gaps, idle hours).
    pub utilization: f64,
    /// Tokens to generate per day.
    pub tokens_per_day: f64,
    /// The API's price per million generated tokens.
    pub api_per_million: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CostEstimate {
    /// Tokens one instance generates per day at the stated utilization.
    pub instance_tokens_per_day: f64,
    /// Self-hosted cost per million tokens on a fully used instance at that utilization.
    pub self_hosted_per_million: f64,
    /// Always-on instances the daily volume needs.
    pub instances: u64,
    pub self_hosted_per_day: f64,
    pub api_per_day: f64,
    /// Daily volume at which one always-on instance costs what the API charges.
    pub break_even_tokens_per_day: f64,
    pub self_host: bool,
}

pub fn estimate(inputs: &CostInputs) -> Result<CostEstimate, String> {
    let positive = [
        ("tokens per second", inputs.tokens_per_sec),
        ("hardware price per hour", inputs.hardware_per_hour),
        ("API price per million tokens", inputs.api_per_million),
    ];
    for (what, value) in positive {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("the {what} must be positive, got {value}"));
        }
    }
    if !(inputs.utilization > 0.0 && inputs.utilization <= 1.0) {
        return Err(format!(
            "utilization must be in (0, 1], got {}",
            inputs.utilization
        ));
    }
    if !(inputs.tokens_per_day.is_finite() && inputs.tokens_per_day >= 0.0) {
        return Err(format!(
            "tokens per day must be >= 0, got {}",
            inputs.tokens_per_day
        ));
    }
    let instance_tokens_per_day = inputs.tokens_per_sec * 86_400.0 * inputs.utilization;
    let instance_per_day = inputs.hardware_per_hour * 24.0;
    let instances = (inputs.tokens_per_day / instance_tokens_per_day)
        .ceil()
        .max(1.0) as u64;
    let self_hosted_per_day = instances as f64 * instance_per_day;
    let api_per_day = inputs.tokens_per_day / 1e6 * inputs.api_per_million;
    Ok(CostEstimate {
        instance_tokens_per_day,
        self_hosted_per_million: instance_per_day / instance_tokens_per_day * 1e6,
        instances,
        self_hosted_per_day,
        api_per_day,
        break_even_tokens_per_day: instance_per_day / inputs.api_per_million * 1e6,
        self_host: self_hosted_per_day < api_per_day,
    })
}

/// The estimate in words, every assumption stated.
pub fn describe(inputs: &CostInputs, estimate: &CostEstimate, source: &str) -> String {
    let recommendation = if estimate.self_host {
        format!(
            "self-host: {} instance(s) cost {:.2}/day against the API's {:.2}/day ({:.0}% less)",
            estimate.instances,
            estimate.self_hosted_per_day,
            estimate.api_per_day,
            100.0 * (1.0 - estimate.self_hosted_per_day / estimate.api_per_day)
        )
    } else {
        format!(
            "use the API: {:.2}/day against {:.2}/day for {} always-on instance(s); self-hosting \
             pays off above {:.3e} tokens/day",
            estimate.api_per_day,
            estimate.self_hosted_per_day,
            estimate.instances,
            estimate.break_even_tokens_per_day
        )
    };
    format!(
        "assumptions:\n\
         \x20 throughput            {:.0} tokens/s per instance ({source})\n\
         \x20 hardware              {:.4} per instance-hour, always on\n\
         \x20 utilization           {:.0}% of the time generating\n\
         \x20 volume                {:.3e} tokens/day\n\
         \x20 API price             {:.4} per million tokens\n\
         results:\n\
         \x20 one instance          {:.3e} tokens/day\n\
         \x20 self-hosted           {:.4} per million tokens (at full load)\n\
         \x20 instances needed      {}\n\
         \x20 self-hosted per day   {:.2}\n\
         \x20 API per day           {:.2}\n\
         \x20 break-even volume     {:.3e} tokens/day (one instance against the API)\n\
         recommendation: {recommendation}\n",
        inputs.tokens_per_sec,
        inputs.hardware_per_hour,
        100.0 * inputs.utilization,
        inputs.tokens_per_day,
        inputs.api_per_million,
        estimate.instance_tokens_per_day,
        estimate.self_hosted_per_million,
        estimate.instances,
        estimate.self_hosted_per_day,
        estimate.api_per_day,
        estimate.break_even_tokens_per_day,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(tokens_per_day: f64) -> CostInputs {
        CostInputs {
            tokens_per_sec: 1000.0,
            hardware_per_hour: 0.10,
            utilization: 0.5,
            tokens_per_day,
            api_per_million: 0.50,
        }
    }

    #[test]
    fn costs_follow_the_stated_arithmetic() {
        // 1000 tokens/s half the time: 43.2M tokens a day for 2.40 a day.
        let estimate = estimate(&inputs(1e8)).unwrap();
        assert!((estimate.instance_tokens_per_day - 43.2e6).abs() < 1e-3);
        assert!((estimate.self_hosted_per_million - 2.40 / 43.2).abs() < 1e-12);
        assert_eq!(
            estimate.instances, 3,
            "100M tokens need ceil(100 / 43.2) instances"
        );
        assert!((estimate.self_hosted_per_day - 7.20).abs() < 1e-9);
        assert!((estimate.api_per_day - 50.0).abs() < 1e-9);
        assert!((estimate.break_even_tokens_per_day - 4.8e6).abs() < 1e-3);
        assert!(estimate.self_host);
    }

    #[test]
    fn small_volumes_go_to_the_api() {
        let estimate = estimate(&inputs(1e6)).unwrap();
        assert_eq!(estimate.instances, 1);
        assert!((estimate.api_per_day - 0.50).abs() < 1e-12);
        assert!(!estimate.self_host);
        let text = describe(&inputs(1e6), &estimate, "given");
        assert!(text.contains("use the API"), "{text}");
        assert!(text.contains("break-even volume     4.800e6"), "{text}");
    }

    #[test]
    fn impossible_assumptions_are_refused() {
        let mut bad = inputs(1e6);
        bad.utilization = 0.0;
        assert!(estimate(&bad).unwrap_err().contains("utilization"));
        bad = inputs(1e6);
        bad.tokens_per_sec = -1.0;
        assert!(estimate(&bad).unwrap_err().contains("tokens per second"));
    }
}
