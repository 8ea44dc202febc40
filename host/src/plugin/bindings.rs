//! Host bindings of the `iotdr:plugin` contract and the per-instance store state.

use super::batch::{Batch, BatchError};
use crate::event::{Entity, Operation};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{StoreLimits, bail};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "stage",
        with: { "iotdr:plugin/types.batch": super::BatchHandle },
        // Host methods trap on misuse (an index out of range, a runaway split).
        imports: { default: trappable },
    });
}

use generated::iotdr;
pub use generated::iotdr::plugin::host::Level;
use generated::iotdr::plugin::types::CodedColumn;
pub use generated::iotdr::plugin::types::{Entity as WitEntity, Operation as WitOperation, Outcome};
pub use generated::{Stage, StagePre};

/// The `batch` resource as the guest holds it. A call has exactly one batch,
/// kept in [`StoreState::batch`], so the handle itself carries nothing.
pub struct BatchHandle;

/// Longest plug-in log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 4096;
/// Distinct counters one instance may create.
const MAX_COUNTERS: usize = 256;

pub struct StoreState {
    pub batch: Batch,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    pub stage: Arc<str>,
    pub counters: BTreeMap<String, u64>,
    /// The last message the plug-in logged at `error` (the SDK logs panics
    /// there), quoted when the call fails.
    pub last_error: Option<String>,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn trap(error: BatchError) -> wasmtime::Error {
    wasmtime::Error::msg(error.to_string())
}

/// A write to many events names each event at most once.
fn check_indices(method: &str, indices: &[u32], len: usize) -> wasmtime::Result<()> {
    if indices.len() > len {
        bail!("{method}: {} indices for a batch of {len} events", indices.len());
    }
    Ok(())
}

impl iotdr::plugin::types::Host for StoreState {}

impl iotdr::plugin::types::HostBatch for StoreState {
    fn len(&mut self, _: Resource<BatchHandle>) -> wasmtime::Result<u32> {
        Ok(self.batch.events.len() as u32)
    }
    fn entity(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<WitEntity> {
        Ok(self.batch.get(index).map_err(trap)?.entity.into())
    }
    fn operation(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<WitOperation> {
        Ok(self.batch.get(index).map_err(trap)?.operation.into())
    }
    fn id(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<String> {
        Ok(self.batch.get(index).map_err(trap)?.id.clone())
    }
    fn name(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<String> {
        Ok(self.batch.get(index).map_err(trap)?.name.clone())
    }
    fn set_name(&mut self, _: Resource<BatchHandle>, index: u32, name: String) -> wasmtime::Result<()> {
        if name.is_empty() {
            bail!("set-name: a name cannot be empty");
        }
        self.batch.set_name(index, name).map_err(trap)
    }
    fn source_region(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<String> {
        Ok(self.batch.get(index).map_err(trap)?.source_region.clone())
    }
    fn account_id(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<String> {
        Ok(self.batch.get(index).map_err(trap)?.account_id.clone())
    }
    fn timestamp_ms(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<u64> {
        Ok(self.batch.get(index).map_err(trap)?.timestamp_ms)
    }
    fn version(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<Option<u64>> {
        Ok(self.batch.get(index).map_err(trap)?.version)
    }
    fn targets(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<Vec<String>> {
        Ok(self.batch.get(index).map_err(trap)?.targets.clone())
    }
    fn set_targets(&mut self, _: Resource<BatchHandle>, index: u32, regions: Vec<String>) -> wasmtime::Result<()> {
        self.batch.set_targets(index, regions).map_err(trap)
    }
    fn attribute(&mut self, _: Resource<BatchHandle>, index: u32, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.batch.get(index).map_err(trap)?.attributes.get(&key).cloned())
    }
    fn attributes(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<Vec<(String, String)>> {
        let event = self.batch.get(index).map_err(trap)?;
        Ok(event.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn set_attribute(
        &mut self,
        _: Resource<BatchHandle>,
        index: u32,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        if key.is_empty() {
            bail!("set-attribute: an attribute key cannot be empty");
        }
        let key = self.batch.key(key).map_err(trap)?;
        self.batch.set_attribute(index, key, value).map_err(trap)
    }
    fn remove_attribute(&mut self, _: Resource<BatchHandle>, index: u32, key: String) -> wasmtime::Result<bool> {
        let key = self.batch.key(key).map_err(trap)?;
        self.batch.remove_attribute(index, key).map_err(trap)
    }
    fn related(&mut self, _: Resource<BatchHandle>, index: u32, kind: String) -> wasmtime::Result<Option<String>> {
        Ok(self.batch.get(index).map_err(trap)?.related(&kind).map(str::to_string))
    }
    fn related_all(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.batch.get(index).map_err(trap)?.related.clone())
    }
    fn set_related(
        &mut self,
        _: Resource<BatchHandle>,
        index: u32,
        kind: String,
        name: Option<String>,
    ) -> wasmtime::Result<()> {
        self.batch.set_related(index, kind, name).map_err(trap)
    }
    fn add_related(
        &mut self,
        _: Resource<BatchHandle>,
        index: u32,
        kind: String,
        name: String,
    ) -> wasmtime::Result<()> {
        if kind.is_empty() || name.is_empty() {
            bail!("add-related: kind and name cannot be empty");
        }
        self.batch.add_related(index, kind, name).map_err(trap)
    }
    fn document(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<Option<String>> {
        Ok(self.batch.get(index).map_err(trap)?.document.clone())
    }
    fn set_document(&mut self, _: Resource<BatchHandle>, index: u32, document: Option<String>) -> wasmtime::Result<()> {
        self.batch.set_document(index, document).map_err(trap)
    }
    fn duplicate(&mut self, _: Resource<BatchHandle>, index: u32) -> wasmtime::Result<u32> {
        self.batch.duplicate(index).map_err(trap)
    }
    fn entities(&mut self, _: Resource<BatchHandle>) -> wasmtime::Result<Vec<WitEntity>> {
        Ok(self.batch.events.iter().map(|e| e.entity.into()).collect())
    }
    fn attribute_column(&mut self, _: Resource<BatchHandle>, key: String) -> wasmtime::Result<Vec<Option<String>>> {
        Ok(self.batch.events.iter().map(|e| e.attributes.get(&key).cloned()).collect())
    }
    fn attribute_codes(&mut self, _: Resource<BatchHandle>, key: String) -> wasmtime::Result<CodedColumn> {
        let (values, codes) = self.batch.attribute_codes(&key);
        Ok(CodedColumn { values, codes })
    }
    fn set_targets_of(
        &mut self,
        _: Resource<BatchHandle>,
        indices: Vec<u32>,
        regions: Vec<String>,
    ) -> wasmtime::Result<()> {
        check_indices("set-targets-of", &indices, self.batch.events.len())?;
        for index in indices {
            self.batch.set_targets(index, regions.clone()).map_err(trap)?;
        }
        Ok(())
    }
    fn set_attribute_of(
        &mut self,
        _: Resource<BatchHandle>,
        indices: Vec<u32>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        check_indices("set-attribute-of", &indices, self.batch.events.len())?;
        if key.is_empty() {
            bail!("set-attribute-of: an attribute key cannot be empty");
        }
        let key = self.batch.key(key).map_err(trap)?;
        for index in indices {
            self.batch.set_attribute(index, key, value.clone()).map_err(trap)?;
        }
        Ok(())
    }
    fn remove_attribute_of(
        &mut self,
        _: Resource<BatchHandle>,
        indices: Vec<u32>,
        key: String,
    ) -> wasmtime::Result<()> {
        check_indices("remove-attribute-of", &indices, self.batch.events.len())?;
        let key = self.batch.key(key).map_err(trap)?;
        for index in indices {
            self.batch.remove_attribute(index, key).map_err(trap)?;
        }
        Ok(())
    }
    fn rename_attribute_of(
        &mut self,
        _: Resource<BatchHandle>,
        indices: Vec<u32>,
        key: String,
        new_key: String,
    ) -> wasmtime::Result<()> {
        check_indices("rename-attribute-of", &indices, self.batch.events.len())?;
        if new_key.is_empty() {
            bail!("rename-attribute-of: an attribute key cannot be empty");
        }
        let (key, new_key) = (self.batch.key(key).map_err(trap)?, self.batch.key(new_key).map_err(trap)?);
        for index in indices {
            self.batch.rename_attribute(index, key, new_key).map_err(trap)?;
        }
        Ok(())
    }
    fn drop(&mut self, _: Resource<BatchHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl iotdr::plugin::host::Host for StoreState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let stage = &*self.stage;
        match level {
            Level::Debug => tracing::debug!(target: "iotdr::plugin", stage, "{message}"),
            Level::Info => tracing::info!(target: "iotdr::plugin", stage, "{message}"),
            Level::Warn => tracing::warn!(target: "iotdr::plugin", stage, "{message}"),
            Level::Error => {
                tracing::error!(target: "iotdr::plugin", stage, "{message}");
                self.last_error = Some(message);
            }
        }
        Ok(())
    }

    fn count(&mut self, metric: String, delta: u64) -> wasmtime::Result<()> {
        if let Some(value) = self.counters.get_mut(&metric) {
            *value = value.saturating_add(delta);
        } else if self.counters.len() < MAX_COUNTERS {
            self.counters.insert(metric, delta);
        }
        Ok(())
    }
}

impl From<Entity> for WitEntity {
    fn from(entity: Entity) -> WitEntity {
        match entity {
            Entity::Thing => WitEntity::Thing,
            Entity::ThingType => WitEntity::ThingType,
            Entity::ThingTypeAssociation => WitEntity::ThingTypeAssociation,
            Entity::ThingGroup => WitEntity::ThingGroup,
            Entity::ThingGroupMembership => WitEntity::ThingGroupMembership,
            Entity::ThingGroupHierarchy => WitEntity::ThingGroupHierarchy,
            Entity::BillingGroup => WitEntity::BillingGroup,
            Entity::BillingGroupMembership => WitEntity::BillingGroupMembership,
            Entity::Certificate => WitEntity::Certificate,
            Entity::Policy => WitEntity::Policy,
            Entity::Shadow => WitEntity::Shadow,
        }
    }
}

impl From<WitEntity> for Entity {
    fn from(entity: WitEntity) -> Entity {
        match entity {
            WitEntity::Thing => Entity::Thing,
            WitEntity::ThingType => Entity::ThingType,
            WitEntity::ThingTypeAssociation => Entity::ThingTypeAssociation,
            WitEntity::ThingGroup => Entity::ThingGroup,
            WitEntity::ThingGroupMembership => Entity::ThingGroupMembership,
            WitEntity::ThingGroupHierarchy => Entity::ThingGroupHierarchy,
            WitEntity::BillingGroup => Entity::BillingGroup,
            WitEntity::BillingGroupMembership => Entity::BillingGroupMembership,
            WitEntity::Certificate => Entity::Certificate,
            WitEntity::Policy => Entity::Policy,
            WitEntity::Shadow => Entity::Shadow,
        }
    }
}

impl From<Operation> for WitOperation {
    fn from(operation: Operation) -> WitOperation {
        match operation {
            Operation::Created => WitOperation::Created,
            Operation::Updated => WitOperation::Updated,
            Operation::Deleted => WitOperation::Deleted,
            Operation::Added => WitOperation::Added,
            Operation::Removed => WitOperation::Removed,
        }
    }
}
