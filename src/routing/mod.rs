//! Routing: from the model alias a client names to the deployment that serves it.
//!
//! Built once from `[models]` at start-up; a lookup is one hash-map probe on the hot path.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::GatewayError;
use crate::providers::Provider;

/// One place a model alias can be served: a provider and the upstream model name.
pub struct Deployment {
    pub provider: Arc<Provider>,
    /// The model name sent upstream.
    pub model: String,
}

/// A client-facing model name and where it goes.
pub struct Route {
    pub alias: String,
    pub deployment: Deployment,
}

/// Every configured alias.
#[derive(Default)]
pub struct ModelTable {
    routes: HashMap<String, Arc<Route>>,
    /// Aliases in config order, for `/v1/models`.
    order: Vec<String>,
}

impl ModelTable {
    pub fn insert(&mut self, route: Route) {
        self.order.push(route.alias.clone());
        self.routes.insert(route.alias.clone(), Arc::new(route));
    }

    /// # Errors
    /// 404 `model_not_found` for an alias that is not configured.
    pub fn resolve(&self, alias: &str) -> Result<Arc<Route>, GatewayError> {
        self.routes
            .get(alias)
            .cloned()
            .ok_or_else(|| GatewayError::ModelNotFound(alias.to_string()))
    }

    /// Routes in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.order.iter().filter_map(|alias| self.routes.get(alias))
    }
}
