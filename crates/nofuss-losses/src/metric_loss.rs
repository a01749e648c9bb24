//! One type for every loss, so a trainer can pick a loss by name.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::proxy_nca::proxy_nca_counted;
use crate::proxy_triplet::proxy_triplet_counted;
use crate::{
    create_proxies, nca_loss, triplet_loss, Assignment, LossError, NcaConfig, ProxyInit,
    ProxyNcaConfig, ProxyTripletConfig, Result, TripletConfig, TripletMining,
};

/// A loss with its settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossSpec {
    /// Proxy-NCA ([`proxy_nca`](crate::proxy_nca)).
    ProxyNca(ProxyNcaConfig),
    /// Proxy-Triplet ([`proxy_triplet`](crate::proxy_triplet)).
    ProxyTriplet(ProxyTripletConfig),
    /// The in-batch triplet loss ([`triplet_loss`]).
    Triplet(TripletConfig),
    /// In-batch NCA ([`nca_loss`]).
    Nca(NcaConfig),
}

impl LossSpec {
    /// The names [`LossSpec::name`] gives, for messages.
    pub const NAMES: &'static str = "proxy-nca, proxy-triplet, triplet, triplet-semihard, nca";

    /// The same loss with its finiteness checks (one host synchronisation each, every
    /// call) on or off. A caller that reads the loss value anyway can turn them off and
    /// treat a non-finite loss as the error: on a GPU the checks stall the device queue.
    pub fn with_check_finite(mut self, on: bool) -> Self {
        match &mut self {
            Self::ProxyNca(c) => c.check_finite = on,
            Self::ProxyTriplet(c) => c.check_finite = on,
            Self::Triplet(c) => c.check_finite = on,
            Self::Nca(c) => c.check_finite = on,
        }
        self
    }

    /// The command-line name: `proxy-nca`, `proxy-triplet`, `triplet` (all triplets),
    /// `triplet-semihard` or `nca`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ProxyNca(_) => "proxy-nca",
            Self::ProxyTriplet(_) => "proxy-triplet",
            Self::Triplet(c) if c.mining == TripletMining::SemiHard => "triplet-semihard",
            Self::Triplet(_) => "triplet",
            Self::Nca(_) => "nca",
        }
    }

    /// Whether the loss learns proxies.
    pub fn uses_proxies(&self) -> bool {
        matches!(self, Self::ProxyNca(_) | Self::ProxyTriplet(_))
    }

    /// Whether each call off the CPU reads the batch on the host (its labels, or
    /// distances to the proxies) and uploads what it picked: the in-batch triplet and NCA
    /// baselines, and Proxy-Triplet with more hardest negatives than a device selection
    /// takes (`nofuss_tensor::select::MAX_K`). Such a loss waits for the device at every
    /// call and sends small tensors that change from batch to batch. The proxy losses
    /// otherwise queue all their work on the device without waiting for it, dynamic
    /// assignment included (its picks made as masks on the device); their finiteness
    /// checks still wait, when on.
    pub fn selects_on_host(&self) -> bool {
        match self {
            Self::ProxyNca(_) => false,
            Self::ProxyTriplet(c) => c
                .hardest_negatives
                .is_some_and(|k| !crate::proxy_triplet::hardest_on_device(k)),
            Self::Triplet(_) | Self::Nca(_) => true,
        }
    }

    /// The proxy assignment (static for losses without proxies).
    pub fn assignment(&self) -> Assignment {
        match self {
            Self::ProxyNca(c) => c.assignment,
            Self::ProxyTriplet(c) => c.assignment,
            _ => Assignment::Static,
        }
    }
}

/// A loss, owning its proxies when it has some.
#[derive(Debug, Clone)]
pub struct MetricLoss {
    spec: LossSpec,
    proxies: Option<Tensor>,
}

impl MetricLoss {
    /// Builds the loss; proxy losses create `num_proxies` proxies of dimension `dim`
    /// named `proxies` in `vb` (static assignment needs one per class).
    pub fn new(
        spec: LossSpec,
        num_proxies: usize,
        dim: usize,
        init: ProxyInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        match &spec {
            LossSpec::ProxyNca(c) => c.check()?,
            LossSpec::ProxyTriplet(c) => c.check()?,
            _ => {}
        }
        let proxies = if spec.uses_proxies() {
            if num_proxies < 2 {
                return Err(LossError::Config(format!(
                    "{} needs at least 2 proxies, got {num_proxies}",
                    spec.name()
                )));
            }
            Some(create_proxies(num_proxies, dim, init, vb)?)
        } else {
            None
        };
        Ok(Self { spec, proxies })
    }

    /// The settings.
    pub fn spec(&self) -> &LossSpec {
        &self.spec
    }

    /// The proxies `[P,D]`, for proxy losses.
    pub fn proxies(&self) -> Option<&Tensor> {
        self.proxies.as_ref()
    }

    /// The loss of a batch of `embeddings` `[N,D]` with class `labels` `[N]`.
    pub fn loss(&self, embeddings: &Tensor, labels: &Tensor) -> Result<Tensor> {
        Ok(self.loss_with_anchors(embeddings, labels)?.0)
    }

    /// [`MetricLoss::loss`] and, where the loss picked its anchors on the device (dynamic
    /// assignment off the CPU, see [`Assignment::Dynamic`]), the number of anchors that
    /// took part as a scalar tensor on that device, to read with the loss: 0 means the
    /// batch had nothing to learn from (the loss is then 0 with zero gradients, where the
    /// host selection returns [`LossError::NoPairs`]). `None` for every other loss, which
    /// reports such a batch as [`LossError::NoPairs`].
    pub fn loss_with_anchors(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let proxies = || {
            self.proxies
                .as_ref()
                .ok_or_else(|| LossError::Config("proxy loss without proxies".into()))
        };
        match &self.spec {
            LossSpec::ProxyNca(c) => proxy_nca_counted(embeddings, labels, proxies()?, c),
            LossSpec::ProxyTriplet(c) => proxy_triplet_counted(embeddings, labels, proxies()?, c),
            LossSpec::Triplet(c) => Ok((triplet_loss(embeddings, labels, c)?, None)),
            LossSpec::Nca(c) => Ok((nca_loss(embeddings, labels, c)?, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn every_loss_runs_through_the_wrapper() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap();
        let y = Tensor::new(&[0u32, 0, 1, 1, 2, 2, 0, 1], &dev).unwrap();
        let specs = [
            LossSpec::ProxyNca(ProxyNcaConfig::default()),
            LossSpec::ProxyTriplet(ProxyTripletConfig::default()),
            LossSpec::Triplet(TripletConfig::default()),
            LossSpec::Triplet(TripletConfig {
                mining: TripletMining::SemiHard,
                ..Default::default()
            }),
            LossSpec::Nca(NcaConfig::default()),
        ];
        let names: Vec<&str> = specs.iter().map(|s| s.name()).collect();
        assert_eq!(LossSpec::NAMES, names.join(", "));
        for spec in specs {
            let vars = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
            let l = MetricLoss::new(spec, 3, 4, ProxyInit::Normal, vb).unwrap();
            assert_eq!(l.proxies().is_some(), spec.uses_proxies());
            assert!(l
                .loss(&x, &y)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite());
        }
        let vb = VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &dev);
        let one = MetricLoss::new(specs[0], 1, 4, ProxyInit::Normal, vb);
        assert!(one.is_err());
    }

    #[test]
    fn proxy_losses_queue_without_host_selection() {
        let dynamic = Assignment::Dynamic;
        let host = |s: LossSpec| s.selects_on_host();
        assert!(!host(LossSpec::ProxyNca(ProxyNcaConfig::default())));
        assert!(!host(LossSpec::ProxyTriplet(ProxyTripletConfig::default())));
        // Dynamic assignment picks on the device too.
        assert!(!host(LossSpec::ProxyNca(ProxyNcaConfig {
            assignment: dynamic,
            ..Default::default()
        })));
        assert!(!host(LossSpec::ProxyTriplet(ProxyTripletConfig {
            assignment: dynamic,
            hardest_negatives: Some(5),
            ..Default::default()
        })));
        assert!(host(LossSpec::ProxyTriplet(ProxyTripletConfig {
            assignment: dynamic,
            hardest_negatives: Some(nofuss_tensor::select::MAX_K + 1),
            ..Default::default()
        })));
        // The k hardest static negatives are picked on the device while it can.
        assert!(!host(LossSpec::ProxyTriplet(ProxyTripletConfig {
            hardest_negatives: Some(3),
            ..Default::default()
        })));
        assert!(host(LossSpec::ProxyTriplet(ProxyTripletConfig {
            hardest_negatives: Some(nofuss_tensor::select::MAX_K + 1),
            ..Default::default()
        })));
        assert!(host(LossSpec::Triplet(TripletConfig::default())));
        assert!(host(LossSpec::Nca(NcaConfig::default())));
    }
}
