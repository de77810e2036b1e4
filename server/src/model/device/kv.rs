//! The device KV cache: one pool per model, with a fixed slot per live sequence.
//!
//! Keys and values of every layer live in `[slots, n_kv_heads, capacity, head_dim]` tensors in
//! the compute dtype. A sequence leases a slot at its first pass and gives it back when its
//! [`KvCache`](crate::model::arch::llama::KvCache) is dropped. Because all sequences share one
//! tensor per layer, a batch's new keys and values are written by one scatter per layer, and a
//! batch's history is one gather (or no copy at all, when the batch's slots are consecutive).
//!
//! The pool grows by doubling, in slots (more sequences at once) and in capacity (longer
//! sequences), up to the context length; it never shrinks, so a long-running server settles at
//! the size of its largest batch. A slot is zeroed when it is handed out again, so positions a
//! sequence has not written hold zeros rather than another sequence's keys.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Mutex};

/// Slots handed back by dropped caches, shared by the pool and its leases.
type FreeList = Arc<Mutex<Vec<usize>>>;

/// A sequence's claim on one pool slot; the slot returns to the pool on drop.
pub struct SlotLease {
    slot: usize,
    free: FreeList,
}

impl SlotLease {
    pub fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.slot);
    }
}

impl std::fmt::Debug for SlotLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotLease({})", self.slot)
    }
}

/// Shape of the pool's per-layer tensors.
#[derive(Debug, Clone, Copy)]
pub struct KvGeometry {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The model's context: capacity never grows past it.
    pub max_capacity: usize,
    pub dtype: DType,
}

pub struct KvPool {
    geo: KvGeometry,
    device: Device,
    /// Per layer: (keys, values), each `[slots, n_kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    slots: usize,
    capacity: usize,
    free: FreeList,
    /// Slots that have held a sequence since they were last zeroed.
    dirty: Vec<bool>,
}

/// Capacity of a new pool, in tokens per slot, and slots of a new pool.
const FIRST_CAPACITY: usize = 64;
const FIRST_SLOTS: usize = 4;

impl KvPool {
    pub fn new(geo: KvGeometry, device: &Device) -> Self {
        Self {
            geo,
            device: device.clone(),
            layers: Vec::new(),
            slots: 0,
            capacity: 0,
            free: Arc::new(Mutex::new(Vec::new())),
            dirty: Vec::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Device memory the pool holds.
    pub fn bytes(&self) -> usize {
        2 * self.geo.n_layers
            * self.slots
            * self.geo.n_kv_heads
            * self.capacity
            * self.geo.head_dim
            * self.geo.dtype.size_in_bytes()
    }

    /// Whether `lease` is one of this pool's.
    pub fn owns(&self, lease: &SlotLease) -> bool {
        Arc::ptr_eq(&self.free, &lease.free) && lease.slot < self.slots
    }

    fn zeros(&self, slots: usize, capacity: usize) -> Result<Tensor> {
        Tensor::zeros((slots, self.geo.n_kv_heads, capacity, self.geo.head_dim), self.geo.dtype, &self.device)
    }

    /// Hands out the lowest free slot, growing the pool when none is free, zeroed.
    pub fn acquire(&mut self) -> Result<SlotLease> {
        let slot = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.is_empty() {
                drop(free);
                self.grow_slots()?;
                free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            }
            let (at, _) = free.iter().enumerate().min_by_key(|&(_, s)| *s).expect("free slots after growing");
            free.swap_remove(at)
        };
        if self.dirty[slot] {
            let zeros = self.zeros(1, self.capacity)?;
            for (k, v) in &self.layers {
                k.slice_set(&zeros, 0, slot)?;
                v.slice_set(&zeros, 0, slot)?;
            }
        }
        self.dirty[slot] = true;
        Ok(SlotLease { slot, free: self.free.clone() })
    }

    fn grow_slots(&mut self) -> Result<()> {
        let slots = (2 * self.slots).max(FIRST_SLOTS);
        let capacity = self.capacity.max(FIRST_CAPACITY.min(self.geo.max_capacity));
        let extra = self.zeros(slots - self.slots, capacity)?;
        self.layers = if self.layers.is_empty() {
            (0..self.geo.n_layers)
                .map(|_| Ok((self.zeros(slots, capacity)?, self.zeros(slots, capacity)?)))
                .collect::<Result<_>>()?
        } else {
            self.layers
                .iter()
                .map(|(k, v)| Ok((Tensor::cat(&[k, &extra], 0)?, Tensor::cat(&[v, &extra], 0)?)))
                .collect::<Result<_>>()?
        };
        self.free.lock().unwrap_or_else(|e| e.into_inner()).extend(self.slots..slots);
        self.dirty.resize(slots, false);
        self.slots = slots;
        self.capacity = capacity;
        Ok(())
    }

    /// Makes every slot hold at least `tokens` positions.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        if tokens <= self.capacity {
            return Ok(());
        }
        if tokens > self.geo.max_capacity {
            candle_core::bail!("{tokens} positions exceed the context of {}", self.geo.max_capacity);
        }
        let capacity = tokens.next_power_of_two().max(FIRST_CAPACITY).min(self.geo.max_capacity);
        if self.slots == 0 {
            self.capacity = capacity;
            return Ok(());
        }
        let grown = |old: &Tensor| -> Result<Tensor> {
            let t = self.zeros(self.slots, capacity)?;
            t.slice_set(old, 2, 0)?;
            Ok(t)
        };
        self.layers = self.layers.iter().map(|(k, v)| Ok((grown(k)?, grown(v)?))).collect::<Result<_>>()?;
        self.capacity = capacity;
        Ok(())
    }

    /// Keys and values of `layer`, `[slots, n_kv_heads, capacity, head_dim]`.
    pub fn layer(&self, layer: usize) -> &(Tensor, Tensor) {
        &self.layers[layer]
    }

    /// Writes new keys and values (`[n, n_kv_heads, head_dim]`, in any dtype) at the rows of
    /// `index` (from [`Self::write_index`]).
    pub fn write(&self, layer: usize, index: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        let rows = self.slots * self.geo.n_kv_heads * self.capacity;
        let flat = |t: &Tensor| t.reshape((rows, self.geo.head_dim));
        let new = |t: &Tensor| t.to_dtype(self.geo.dtype)?.reshape(((), self.geo.head_dim))?.contiguous();
        flat(kc)?.scatter_set(index, &new(k)?, 0)?;
        flat(vc)?.scatter_set(index, &new(v)?, 0)
    }

    /// Destination rows, in the pool's flattened `[slots · n_kv_heads · capacity, head_dim]`
    /// view, of every (token, kv head) of a pass: `tokens` lists (slot, position) per packed token.
    pub fn write_index(&self, tokens: &[(usize, usize)]) -> Result<Tensor> {
        let (h, cap, hd) = (self.geo.n_kv_heads, self.capacity, self.geo.head_dim);
        let mut idx = Vec::with_capacity(tokens.len() * h * hd);
        for &(slot, pos) in tokens {
            for head in 0..h {
                let row = ((slot * h + head) * cap + pos) as u32;
                idx.extend(std::iter::repeat_n(row, hd));
            }
        }
        Tensor::from_vec(idx, (tokens.len() * h, hd), &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> KvPool {
        let geo = KvGeometry { n_layers: 2, n_kv_heads: 2, head_dim: 4, max_capacity: 300, dtype: DType::F32 };
        KvPool::new(geo, &Device::Cpu)
    }

    #[test]
    fn slots_are_reused_lowest_first_and_zeroed() -> Result<()> {
        let mut p = pool();
        let a = p.acquire()?;
        let b = p.acquire()?;
        assert_eq!((a.slot(), b.slot()), (0, 1));
        let k = Tensor::ones((1, 2, 4), DType::F32, &Device::Cpu)?;
        p.write(0, &p.write_index(&[(b.slot(), 3)])?, &k, &k)?;
        let written = p.layer(0).0.get(1)?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(written, 8.0);
        drop(b);
        let again = p.acquire()?;
        assert_eq!(again.slot(), 1);
        assert_eq!(p.layer(0).0.get(1)?.sum_all()?.to_scalar::<f32>()?, 0.0, "a reused slot starts zeroed");
        Ok(())
    }

    #[test]
    fn growing_keeps_what_was_written() -> Result<()> {
        let mut p = pool();
        let leases = (0..5).map(|_| p.acquire()).collect::<Result<Vec<_>>>()?;
        assert_eq!(p.slots(), 8);
        let k = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 2, 4))?;
        p.write(1, &p.write_index(&[(leases[4].slot(), 63)])?, &k, &k)?;
        p.reserve(65)?;
        assert_eq!(p.capacity(), 128);
        let kept = p.layer(1).0.get(4)?.narrow(1, 63, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(kept, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert!(p.reserve(301).is_err(), "past the context");
        p.reserve(300)?;
        assert_eq!(p.capacity(), 300);
        Ok(())
    }
}
