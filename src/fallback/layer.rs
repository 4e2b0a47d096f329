//! `FallbackLayer`: the chain as a layer over **one** inner service, walking variants of the
//! request (a model, a deployment, `override_params`, a named set of backends) instead of
//! separate target services.

use std::sync::Arc;

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{Fallback, Overrides, Settings};
use crate::body::ReplayBody;
use crate::error::BoxError;
use crate::error::InvalidConfig;

/// One variant of a request in a [`FallbackLayer`]: what changes before it goes to the inner
/// service again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Variant {
    name: String,
    overrides: Overrides,
    deployment: Option<String>,
    backends: Option<Vec<String>>,
}

impl Variant {
    /// A variant named `name` (in attribution and errors) that changes nothing yet: the
    /// request as the caller wrote it.
    pub fn new(name: impl Into<String>) -> Self {
        Variant {
            name: name.into(),
            ..Variant::default()
        }
    }

    /// The same request for another model: sets the body's `model` (and a `Balance` below
    /// picks among the backends serving it, see
    /// [`BackendBuilder::models`](crate::backend::BackendBuilder::models)).
    pub fn model(name: &str) -> Self {
        Variant::new(name).set("model", name)
    }

    /// Sets a JSON body field for this variant (Portkey's `override_params`).
    pub fn set(mut self, field: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.overrides = self.overrides.set(field, value);
        self
    }

    /// Sends this variant to this deployment on classic Azure backends.
    pub fn deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = Some(deployment.into());
        self
    }

    /// Lets only these backends of the `Balance` below take this variant (a named group of
    /// the backends: the same model in other regions, a provisioned deployment first).
    pub fn backends<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.backends = Some(names.into_iter().map(Into::into).collect());
        self
    }
}

/// [`Fallback`] as a layer over one inner service: each request goes through the inner service
/// as the first variant, then (on a triggering outcome) as the next, and so on, with the module's
/// rules (fail fast on every variant but the last, one deadline, attribution, a 4xx returned at
/// once).
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_llm_lb::{Backend, auth::{AuthInjectLayer, Credential}, balance::BalanceLayer,
///                    body::ReplayBody, client::http_client, endpoint::EndpointLayer,
///                    fallback::{FallbackLayer, ServedPath, Variant}, retry::RetryAfter429Layer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
/// # let mock = tower_llm_lb_mock::MockServer::builder().bearer("k").start().await?;
/// // One OpenAI-compatible backend serving only the small model.
/// let backend = Backend::openai("local", format!("{}/v1", mock.url()))
///     .credential(Credential::bearer("k")?)
///     .models(["gpt-4o-mini"])
///     .build()?;
/// let svc = ServiceBuilder::new()
///     .layer(FallbackLayer::new("chat").variant(Variant::new("as asked")).variant(Variant::model("gpt-4o-mini")))
///     .layer(RetryAfter429Layer::default())
///     .layer(BalanceLayer::try_new([backend])?)
///     .layer(EndpointLayer::for_chosen())
///     .layer(AuthInjectLayer::for_chosen())
///     .service(http_client::<ReplayBody>());
/// let req = http::Request::post("/v1/chat/completions")
///     .body(ReplayBody::from(r#"{"model":"gpt-4o","messages":[]}"#))?;
/// let res = svc.oneshot(req).await?;
/// // Nobody serves gpt-4o: the request was refused without sending, so it moved on.
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.extensions().get::<ServedPath>().unwrap().to_string(), "chat[1:gpt-4o-mini] -> local");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FallbackLayer {
    name: String,
    variants: Vec<Variant>,
    settings: Settings,
}

impl FallbackLayer {
    /// A chain named `name`, with no variants yet (add them in order with
    /// [`FallbackLayer::variant`]; with none, the request goes through once as it is).
    pub fn new(name: impl Into<String>) -> Self {
        FallbackLayer {
            name: name.into(),
            variants: Vec::new(),
            settings: Settings::default(),
        }
    }

    /// Adds the next variant.
    pub fn variant(mut self, variant: Variant) -> Self {
        self.variants.push(variant);
        self
    }

    /// How the chain moves on to the next variant (see [`Settings`]; its `deadline` spans all
    /// variants and their retries).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Checks the variants (names, deployments) as [`Layer::layer`] would, which cannot fail:
    /// there a bad variant answers every request with the error instead.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let probe = tower::service_fn(|_: Request<ReplayBody>| async {
            Ok::<_, BoxError>(Response::new(()))
        });
        self.build(probe).map(drop)
    }

    fn build<S, ResB>(&self, inner: S) -> Result<Fallback<ResB>, InvalidConfig>
    where
        S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        ResB: Send + 'static,
    {
        let mut chain = Fallback::builder(self.name.clone()).settings(self.settings.clone());
        let as_is = [Variant::new("as asked")];
        let variants = if self.variants.is_empty() {
            &as_is[..]
        } else {
            &self.variants[..]
        };
        for v in variants {
            let only: Option<Arc<[Arc<str>]>> = v
                .backends
                .as_ref()
                .map(|b| b.iter().map(|n| Arc::<str>::from(n.as_str())).collect());
            chain = match only {
                None => chain.target_with(v.name.clone(), inner.clone(), v.overrides.clone()),
                Some(names) => chain.target_with(
                    v.name.clone(),
                    tower::util::MapRequest::new(
                        inner.clone(),
                        move |mut req: Request<ReplayBody>| {
                            req.extensions_mut()
                                .insert(crate::attempt::Only(names.clone()));
                            req
                        },
                    ),
                    v.overrides.clone(),
                ),
            };
            if let Some(d) = &v.deployment {
                chain = chain.deployment(d);
            }
        }
        chain.build()
    }
}

/// A response type's body (so [`FallbackLayer`] can name the chain it makes over any service
/// answering `http::Response<B>`).
pub trait ResponseBodyOf {
    /// The body.
    type Body;
    /// The response as an `http::Response`.
    fn into_http(self) -> Response<Self::Body>;
}

impl<B> ResponseBodyOf for Response<B> {
    type Body = B;
    fn into_http(self) -> Response<B> {
        self
    }
}

impl<S> Layer<S> for FallbackLayer
where
    S: Service<Request<ReplayBody>> + Clone + Send + Sync + 'static,
    S::Response: ResponseBodyOf,
    <S::Response as ResponseBodyOf>::Body: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Service = Fallback<<S::Response as ResponseBodyOf>::Body>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = tower::util::MapResponse::new(inner, ResponseBodyOf::into_http);
        match self.build(inner) {
            Ok(chain) => chain,
            // Not buildable (a bad deployment name): every request gets the reason, nothing is
            // sent. `FallbackLayer::validate` reports it up front.
            Err(e) => {
                let e = Arc::new(e.to_string());
                let refuse = tower::service_fn(move |_: Request<ReplayBody>| {
                    let e = e.clone();
                    async move {
                        Err::<Response<<S::Response as ResponseBodyOf>::Body>, BoxError>(
                            e.as_str().into(),
                        )
                    }
                });
                Fallback {
                    shared: Arc::new(super::Shared {
                        name: self.name.as_str().into(),
                        targets: Box::new([super::Target {
                            name: "invalid".into(),
                            service: crate::boxed::BoxTarget::new(refuse),
                            overrides: Overrides::default(),
                            deployment: None,
                        }]),
                        settings: Settings::default(),
                    }),
                }
            }
        }
    }
}
