use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Prometheus metrics of HSM operations. Clones share the same metrics.
#[derive(Clone)]
pub struct HsmMetrics {
    sign_duration: Histogram,
    errors: IntCounterVec,
    session_recoveries: IntCounter,
}

impl HsmMetrics {
    /// Creates the metrics and registers them with `registry`.
    ///
    /// # Errors
    ///
    /// Fails if `registry` already contains metrics with the same names.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::create()?;
        registry.register(Box::new(metrics.sign_duration.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.session_recoveries.clone()))?;
        Ok(metrics)
    }

    /// Creates metrics that no registry exports, for tools and tests.
    pub fn unregistered() -> Self {
        Self::create().expect("the metric options are constant and valid")
    }

    fn create() -> Result<Self, prometheus::Error> {
        // 15 buckets from 50 µs doubling up to 0.82 s: a software token signs in tens of
        // microseconds, a network HSM under load in tens or hundreds of milliseconds.
        let buckets = prometheus::exponential_buckets(0.000_05, 2.0, 15)?;
        let sign_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sigil_hsm_sign_duration_seconds",
                "Duration of Hsm::sign calls, including the wait for a free session",
            )
            .buckets(buckets),
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "sigil_hsm_errors_total",
                "Failed PKCS#11 calls by return code, including calls that succeeded on retry",
            ),
            &["code"],
        )?;
        let session_recoveries = IntCounter::new(
            "sigil_hsm_session_recoveries_total",
            "Times the session pool reopened its sessions after the HSM reported them lost",
        )?;
        Ok(HsmMetrics { sign_duration, errors, session_recoveries })
    }

    pub(crate) fn observe_sign(&self, seconds: f64) {
        self.sign_duration.observe(seconds);
    }

    pub(crate) fn count_error(&self, code: &str) {
        self.errors.with_label_values(&[code]).inc();
    }

    pub(crate) fn count_recovery(&self) {
        self.session_recoveries.inc();
    }
}

impl std::fmt::Debug for HsmMetrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("HsmMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_registers_metric_names() {
        let registry = Registry::new();
        let metrics = HsmMetrics::new(&registry).expect("fresh registry");
        metrics.count_error("CKR_DEVICE_ERROR");

        let names: Vec<String> = registry.gather().iter().map(|family| family.name().to_owned()).collect();
        for expected in
            ["sigil_hsm_sign_duration_seconds", "sigil_hsm_errors_total", "sigil_hsm_session_recoveries_total"]
        {
            assert!(names.iter().any(|name| name == expected), "{expected} missing from {names:?}");
        }
    }

    #[test]
    fn new_twice_on_one_registry_fails() {
        let registry = Registry::new();
        HsmMetrics::new(&registry).expect("fresh registry");
        assert!(HsmMetrics::new(&registry).is_err());
    }
}
