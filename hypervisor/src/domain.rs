//! Domains (guests) and the hypervisor that owns them.

use crate::memory::{GuestMemory, MemoryError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, RwLock};

/// Identifies a domain (a guest, or the host backend) to the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub u16);

impl std::fmt::Display for DomainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dom{}", self.0)
    }
}

/// A guest: an id, a name and its memory.
#[derive(Debug)]
pub struct Domain {
    id: DomainId,
    name: String,
    memory: Arc<GuestMemory>,
}

impl Domain {
    /// The domain's id.
    pub fn id(&self) -> DomainId {
        self.id
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's memory. Only the domain itself (its driver side) and the
    /// hypervisor's own mediation code hold this; device sides get capabilities.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
}

/// The privileged registry of domains.
#[derive(Debug)]
pub struct Hypervisor {
    domains: RwLock<HashMap<DomainId, Arc<Domain>>>,
    next_id: AtomicU16,
}

impl Hypervisor {
    /// Guest address of the first byte of every domain's memory: high enough that a
    /// small integer or a null pointer never names guest memory.
    pub const GUEST_BASE: u64 = 0x4000_0000;

    /// An empty hypervisor. Domain 0 is reserved for the host backend, which owns no
    /// guest memory here.
    pub fn new() -> Arc<Hypervisor> {
        Arc::new(Hypervisor {
            domains: RwLock::new(HashMap::new()),
            next_id: AtomicU16::new(1),
        })
    }

    /// The id of the host backend (the device side when it is not another guest).
    pub const HOST: DomainId = DomainId(0);

    /// Creates a guest with `mem_bytes` of memory (rounded up to pages).
    pub fn create_domain(&self, name: &str, mem_bytes: u64) -> Result<Arc<Domain>, MemoryError> {
        let id = DomainId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let memory = GuestMemory::new(name, Self::GUEST_BASE, mem_bytes)?;
        let d = Arc::new(Domain {
            id,
            name: name.to_string(),
            memory,
        });
        self.domains
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, d.clone());
        tracing::debug!(%id, name, mem_bytes, "domain created");
        Ok(d)
    }

    /// Looks a domain up.
    pub fn domain(&self, id: DomainId) -> Option<Arc<Domain>> {
        self.domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Removes a domain; its memory goes away once the last mapping of it is dropped.
    pub fn destroy_domain(&self, id: DomainId) -> Option<Arc<Domain>> {
        self.domains
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_get_distinct_ids_and_memories() {
        let hv = Hypervisor::new();
        let a = hv.create_domain("a", 1 << 16).unwrap();
        let b = hv.create_domain("b", 1 << 16).unwrap();
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id(), Hypervisor::HOST);
        a.memory().write(Hypervisor::GUEST_BASE, b"A").unwrap();
        let mut x = [0u8; 1];
        b.memory().read(Hypervisor::GUEST_BASE, &mut x).unwrap();
        assert_eq!(x, [0], "guests do not share memory");
        assert_eq!(hv.domain(a.id()).unwrap().name(), "a");
        assert!(hv.destroy_domain(a.id()).is_some());
        assert!(hv.domain(a.id()).is_none());
    }
}
