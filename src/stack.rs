//! Ready-made stacks: the recommended layers over any HTTP client, boxed behind one type.
//!
//! [`group`] builds `RetryAfter429` → `Balance` → per backend `CircuitBreaker` → `Translate` → `Endpoint` →
//! `AttemptTimeout` → `AuthInject` → your client, and boxes it as an [`LlmService`], the type
//! [`Fallback`](crate::fallback::Fallback) targets and nested groups take, so the generic types
//! never reach your code.
//!
//! The seed patterns, each built without touching the network (these compile and run as tests):
//!
//! ```
//! use tower_llm_lb::{Backend, auth::Credential, balance::Balance, client::http_client,
//!                    fallback::{Fallback, Overrides}, stack::{self, Settings}};
//!
//! # fn main() -> Result<(), tower_llm_lb::BoxError> {
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # let _guard = rt.enter();
//! let client = http_client();
//! let settings = Settings::default();
//! let azure = |name: &str, deployment: &str, tier: u32| {
//!     Backend::azure(name, format!("https://{name}.openai.azure.com"), deployment, "2024-10-21")
//!         .credential(Credential::api_key("key").unwrap())
//!         .priority(tier)
//!         .build()
//! };
//!
//! // 1. A bigger model when the small one is out of quota (LangChain's gpt-4-8k -> gpt-4-32k).
//! let bigger = Fallback::builder("gpt-4")
//!     .target("gpt-4-8k", stack::group("8k", [azure("east-8k", "gpt-4-8k", 0)?], client.clone(), &settings)?)
//!     .target_with(
//!         "gpt-4-32k",
//!         stack::group("32k", [azure("east-32k", "gpt-4-32k", 0)?], client.clone(), &settings)?,
//!         Overrides::default().set("model", "gpt-4-32k"),
//!     )
//!     .build()?;
//!
//! // 2. The same model in other regions: a provisioned deployment first, pay-as-you-go behind.
//! let regions = stack::group(
//!     "gpt-4o",
//!     [azure("ptu-eastus", "gpt-4o", 0)?, azure("westus", "gpt-4o", 1)?, azure("sweden", "gpt-4o", 1)?],
//!     client.clone(),
//!     &settings,
//! )?;
//!
//! // 3. Another provider as a last resort.
//! let openai = Backend::openai("openai", "https://api.openai.com/v1")
//!     .credential(Credential::bearer("sk-key")?)
//!     .build()?;
//! let providers = Fallback::builder("providers")
//!     .target("azure", regions.clone())
//!     .target("openai", stack::group("openai", [openai], client.clone(), &settings)?)
//!     .build()?;
//!
//! // 4. A canary: 10% to the new deployment, 90% to the stable one (weight 0 drains it).
//! let canary = stack::group(
//!     "canary",
//!     [
//!         azure("stable", "gpt-4o", 0)?.with_weight(0.9)?,
//!         azure("candidate", "gpt-4o-2024-11-20", 0)?.with_weight(0.1)?,
//!     ],
//!     client.clone(),
//!     &settings,
//! )?;
//! # let _ = (bigger, providers, canary);
//! # Ok(()) }
//! ```

use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_service::Service;

use crate::auth::AuthInjectLayer;
use crate::backend::Backend;
use crate::balance::{Balance, Strategy};
use crate::body::{ReplayBody, ResponseBody};
use crate::circuit_breaker::{BreakerGroup, Policy};
use crate::endpoint::EndpointLayer;
use crate::error::BoxError;
use crate::retry::RetryAfter429Layer;
use crate::timeout::{AttemptTimeoutLayer, SilenceWatch, TimeoutBody, WatchedTimeoutLayer};
use crate::translate::TranslateLayer;

/// The response body of the stacks built here: the backend's body, streamed.
pub type LlmBody = ResponseBody<TimeoutBody<Incoming>>;

/// The stack [`group_over`] (and the config crate's `Config::build_over`) builds over a client whose response
/// body is `ResB`; [`LlmService`] is this over a hyper client.
pub type StackOver<ResB> = crate::boxed::BoxTarget<ResponseBody<TimeoutBody<ResB>>>;

/// A whole stack behind one type: cloneable (by reference count), `Send + Sync`, over
/// replayable requests. See [`BoxTarget`](crate::boxed::BoxTarget).
pub type LlmService = StackOver<Incoming>;

/// How [`group`] builds its layers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The pick strategy within a tier.
    pub strategy: Strategy,
    /// The circuit-breaker policy of every backend.
    pub breaker: Policy,
    /// The largest share of the group the breakers may eject at once.
    pub max_ejection: f64,
    /// Per-attempt time limits.
    pub timeouts: AttemptTimeoutLayer,
    /// Where `timeouts` sets no first-byte limit: an attempt on a backend that has answered
    /// nothing at all (to it or to any other request) for this long, and for 10x the slowest
    /// latency average of the group's other backends, is abandoned as a timeout, so the retry
    /// layer tries another backend and the breaker counts it (default 10 s; `None`: off).
    /// Such a backend gets no new requests after 2 s of silence (and 5x its peers' time) while
    /// another backend of its tier can take them.
    pub silence: Option<std::time::Duration>,
    /// The retry layer over the group.
    pub retry: RetryAfter429Layer,
    /// A `200` JSON answer whose body is an `{"error": {...}}` object is a failure (default on;
    /// see [`endpoint::Settings::json_error_in_success`](crate::endpoint::Settings::json_error_in_success)).
    pub json_error_in_success: bool,
    /// How every backend's endpoint reads answers (classifier, backoff, ...); its
    /// `json_error_in_success` and `rng` are replaced by the fields of the same name here.
    /// `None`: the defaults.
    pub endpoint: Option<crate::endpoint::Settings>,
    /// One seeded random source for every pick, jitter and backoff of the group (repeatable
    /// simulations and tests). `None`: each from entropy.
    pub rng: Option<crate::rng::Rng>,
    /// Health probes of every backend of the group (`None`, the default: no probes). Started
    /// by [`group`] on the current tokio runtime, stopped when the stack is dropped. A backend
    /// failing its probe takes no traffic (its circuit opens); one healthy probe lets it back.
    pub health: Option<crate::circuit_breaker::HealthProbe>,
    /// Health probes of single backends by name, in place of [`Settings::health`].
    pub health_for: std::collections::BTreeMap<String, crate::circuit_breaker::HealthProbe>,
    /// How OpenAI chat requests are translated for Anthropic backends and Anthropic messages
    /// requests for OpenAI ones (see [`translate`](crate::translate)).
    pub translation: crate::translate::Options,
    /// When the group's line of waiting requests stands and refuses early (default: a 1 s
    /// target over 10 s; see [`StandingLine`](crate::balance::StandingLine)); `None`: never.
    pub standing_line: Option<crate::balance::StandingLine>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            strategy: Strategy::default(),
            breaker: Policy::default(),
            max_ejection: 0.5,
            timeouts: AttemptTimeoutLayer::default(),
            silence: Some(std::time::Duration::from_secs(10)),
            retry: RetryAfter429Layer::default(),
            endpoint: None,
            json_error_in_success: true,
            rng: None,
            health: None,
            health_for: std::collections::BTreeMap::new(),
            translation: crate::translate::Options::default(),
            standing_line: Some(crate::balance::StandingLine::default()),
        }
    }
}

/// Builds the recommended stack over `backends` and `client` (see the [module docs](self)).
pub fn group<C>(
    name: &str,
    backends: impl IntoIterator<Item = Backend>,
    client: C,
    settings: &Settings,
) -> Result<LlmService, BoxError>
where
    C: Service<Request<ReplayBody>, Response = Response<Incoming>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    group_over(name, backends, client, settings)
}

/// [`group`] over any client whose response body streams `Bytes` (a client wrapped in its own
/// layers, an in-process service such as the mock's): the same layers, the same defaults.
pub fn group_over<C, ResB>(
    name: &str,
    backends: impl IntoIterator<Item = Backend>,
    client: C,
    settings: &Settings,
) -> Result<StackOver<ResB>, BoxError>
where
    C: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    ResB: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let mut breakers =
        BreakerGroup::try_new(settings.breaker.clone())?.max_ejection(settings.max_ejection)?;
    let mut retry = settings.retry.clone();
    if let Some(rng) = &settings.rng {
        breakers = breakers.rng(rng.clone());
        retry.rng = rng.clone();
    }
    let backends: Vec<Backend> = backends.into_iter().collect();
    // One set of endpoint settings for the group, shared by its backends' endpoints.
    let mut endpoint_settings = settings.endpoint.clone().unwrap_or_default();
    endpoint_settings.json_error_in_success = settings.json_error_in_success;
    if let Some(rng) = &settings.rng {
        endpoint_settings.rng = rng.clone();
    }
    let endpoint = EndpointLayer::for_chosen().settings(endpoint_settings);
    let peers: std::sync::Arc<[crate::BackendState]> =
        backends.iter().map(|b| b.state().clone()).collect();
    let mut probe_error = None;
    let balance = Balance::from_backends(backends, |b| {
        let timeouts = WatchedTimeoutLayer {
            limits: settings.timeouts,
            watch: settings.silence.map(|floor| {
                std::sync::Arc::new(SilenceWatch {
                    own: b.state().clone(),
                    peers: peers.clone(),
                    floor,
                    factor: 10,
                })
            }),
        };
        let endpoint = endpoint.for_backend(b.clone());
        let svc = ServiceBuilder::new()
            .layer(breakers.layer_for(b))
            .layer(TranslateLayer::for_backend(b).options(settings.translation.clone()))
            .layer(endpoint)
            .layer(timeouts)
            .layer(AuthInjectLayer::for_backend(b))
            .service(client.clone());
        let probe = settings
            .health_for
            .get(b.name())
            .or(settings.health.as_ref());
        if let Some(probe) = probe
            && let Err(e) = svc.spawn_health_probe(probe.clone())
        {
            probe_error = Some(e);
        }
        svc
    })
    .name(name)
    .strategy(settings.strategy)
    .standing_line(settings.standing_line);
    let balance = match &settings.rng {
        Some(rng) => balance.rng(rng.clone()),
        None => balance,
    }
    .build()?;
    if let Some(e) = probe_error {
        return Err(e.into());
    }
    let svc = ServiceBuilder::new().layer(retry).service(balance);
    Ok(crate::boxed::BoxTarget::new(svc))
}
