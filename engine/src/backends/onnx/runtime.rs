//! The ONNX Runtime model behind the engine's seam: one `ort` session; each step runs
//! its decoding sequences as one batch (pasts right-padded to the longest) and each
//! prefill chunk on its own, with the sequences' K/V as the graph's `past_key_values.*`
//! inputs, keeping the `present.*` outputs as their K/V for the next step.
//!
//! The graph contract (`scripts/export_onnx.py`): inputs `input_ids` int64 [B, S],
//! `seqlens_k` int32 [B] (each row's total length − 1), `total_sequence_length` int32 []
//! (the longest), `past_key_values.{i}.key|value` f32 [B, kv_heads, past, head_dim];
//! outputs `logits` f32 [B, S, vocab] and `present.{i}.key|value` f32 [B, kv_heads,
//! total, head_dim]. B > 1 only with S = 1.

use std::collections::HashMap;
use std::path::Path;

use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;

use super::manifest::Manifest;
use crate::backends::{
    Capabilities, KvCapacity, KvStorage, ModelRuntime, RowRunner, RuntimeInfo, SeqChunk, SerialRows,
};
use crate::block_allocator::{BlockId, BLOCK_SIZE};
use crate::error::ModelError;

/// One sequence's K/V, layer by layer, as the graph returned them.
struct SeqState {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Positions held.
    len: usize,
    /// The step that last used it (for eviction).
    last_used: u64,
}

/// An exported model on ONNX Runtime.
pub struct OnnxRuntime {
    session: Session,
    manifest: Manifest,
    /// Per sequence, keyed by the first block of its block table (see the seam's doc).
    states: HashMap<BlockId, SeqState>,
    capacity_blocks: usize,
    step: u64,
    /// Input and output names, built once.
    past_names: Vec<(String, String)>,
    present_names: Vec<(String, String)>,
}

fn ort_error<T>(what: &str) -> impl Fn(ort::Error<T>) -> ModelError + '_ {
    move |e| ModelError::Runtime(format!("{what}: {e}"))
}

impl OnnxRuntime {
    /// Opens `dir/model.onnx` with `threads` compute threads; K/V for `kv_cache_tokens`
    /// tokens across sequences (rounded up to whole blocks), in the environment of the
    /// loaded ONNX Runtime ([`super::library::init`]).
    pub fn load(
        env: &Environment,
        dir: &Path,
        manifest: Manifest,
        threads: usize,
        kv_cache_tokens: usize,
    ) -> Result<Self, ModelError> {
        let path = dir.join("model.onnx");
        let session = Session::builder(env)
            .map_err(ort_error("creating an ONNX Runtime session"))?
            .with_intra_threads(threads.max(1))
            .map_err(ort_error("setting ONNX Runtime's threads"))?
            .commit_from_file(&path)
            .map_err(ort_error(&format!("loading {}", path.display())))?;
        let names = |a: &str, b: &str| {
            (0..manifest.n_layers)
                .map(|i| (format!("{a}.{i}.{b}"), format!("{a}.{i}.value")))
                .collect::<Vec<_>>()
        };
        let past_names = names("past_key_values", "key");
        let present_names = names("present", "key");
        for (k, _) in &past_names {
            if !session.inputs().iter().any(|i| i.name() == k) {
                return Err(ModelError::Runtime(format!(
                    "{} has no input {k}: not a model exported by `sluice model export-onnx`",
                    path.display()
                )));
            }
        }
        Ok(OnnxRuntime {
            session,
            capacity_blocks: kv_cache_tokens.div_ceil(BLOCK_SIZE).max(1),
            manifest,
            states: HashMap::new(),
            step: 0,
            past_names,
            present_names,
        })
    }

    /// The state of `c`'s sequence (keyed by its first block), fresh when `c` starts at
    /// position 0; an error when the state does not end where `c` starts.
    fn state_for(&mut self, c: &SeqChunk<'_>) -> Result<BlockId, String> {
        let key = *c
            .block_table
            .first()
            .ok_or("a chunk without blocks reached the ONNX runtime")?;
        if c.start_pos == 0 {
            let n_layers = self.manifest.n_layers;
            self.states.insert(
                key,
                SeqState {
                    keys: vec![Vec::new(); n_layers],
                    values: vec![Vec::new(); n_layers],
                    len: 0,
                    last_used: self.step,
                },
            );
        }
        let held = self.states.get(&key).map_or(usize::MAX, |s| s.len);
        if held != c.start_pos {
            return Err(format!(
                "the ONNX runtime holds {held} positions of a sequence whose chunk starts at {}",
                c.start_pos
            ));
        }
        Ok(key)
    }

    /// Whether `c` can join a decode batch: one new token of a sequence whose K/V is
    /// here up to its start.
    fn decodes(&self, c: &SeqChunk<'_>) -> bool {
        c.tokens.len() == 1
            && c.start_pos > 0
            && c.block_table
                .first()
                .and_then(|k| self.states.get(k))
                .is_some_and(|s| s.len == c.start_pos)
    }

    /// Runs `chunks` as one ONNX Runtime batch: one sequence's chunk of any length, or
    /// several sequences' one-token decodes (each past right-padded to the longest,
    /// each row's own length in `seqlens_k`). Keeps each row's `present` as its K/V and
    /// returns the last position's logits of the rows that want them.
    fn run(&mut self, chunks: &[&SeqChunk<'_>]) -> Result<Vec<Option<Vec<f32>>>, String> {
        fn err<T>(e: ort::Error<T>) -> String {
            e.to_string()
        }
        let (b, h, d) = (
            chunks.len(),
            self.manifest.n_kv_heads,
            self.manifest.head_dim,
        );
        let s = chunks[0].tokens.len();
        if b > 1 && s != 1 {
            return Err("only one-token decodes run batched".into());
        }
        let keys: Vec<BlockId> = chunks
            .iter()
            .map(|c| self.state_for(c))
            .collect::<Result<_, _>>()?;
        let lens: Vec<usize> = chunks.iter().map(|c| c.start_pos).collect();
        let p = lens.iter().copied().max().unwrap_or(0);
        let mut inputs: Vec<(String, SessionInputValue<'static>)> =
            Vec::with_capacity(3 + 2 * self.manifest.n_layers);
        let ids: Vec<i64> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().map(|&t| i64::from(t)))
            .collect();
        inputs.push((
            "input_ids".into(),
            Tensor::from_array(([b, s], ids)).map_err(err)?.into(),
        ));
        let seqlens: Vec<i32> = lens.iter().map(|&l| (l + s - 1) as i32).collect();
        inputs.push((
            "seqlens_k".into(),
            Tensor::from_array(([b], seqlens)).map_err(err)?.into(),
        ));
        inputs.push((
            "total_sequence_length".into(),
            Tensor::from_array(([0usize; 0], vec![(p + s) as i32]))
                .map_err(err)?
                .into(),
        ));
        for (layer, (k_name, v_name)) in self.past_names.iter().enumerate() {
            let mut k = vec![0.0f32; b * h * p * d];
            let mut v = vec![0.0f32; b * h * p * d];
            for (row, key) in keys.iter().enumerate() {
                let st = self.states.get(key).ok_or("state vanished")?;
                let len = st.len;
                for head in 0..h {
                    let src = head * len * d..(head + 1) * len * d;
                    let dst = (row * h + head) * p * d;
                    k[dst..dst + len * d].copy_from_slice(&st.keys[layer][src.clone()]);
                    v[dst..dst + len * d].copy_from_slice(&st.values[layer][src]);
                }
            }
            let shape = [b, h, p, d];
            inputs.push((
                k_name.clone(),
                Tensor::from_array((shape, k)).map_err(err)?.into(),
            ));
            inputs.push((
                v_name.clone(),
                Tensor::from_array((shape, v)).map_err(err)?.into(),
            ));
        }
        let outputs = self.session.run(inputs).map_err(err)?;
        // Row r's present holds its len + s positions at the start of a stride of p + s.
        let stride = p + s;
        for (layer, (k_name, v_name)) in self.present_names.iter().enumerate() {
            let (_, k) = outputs[k_name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(err)?;
            let (_, v) = outputs[v_name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(err)?;
            if k.len() != b * h * stride * d || v.len() != k.len() {
                return Err(format!("present.{layer} holds {} values", k.len()));
            }
            for (row, key) in keys.iter().enumerate() {
                let st = self.states.get_mut(key).ok_or("state vanished")?;
                let len = st.len + s;
                let mut nk = Vec::with_capacity(h * len * d);
                let mut nv = Vec::with_capacity(h * len * d);
                for head in 0..h {
                    let src = (row * h + head) * stride * d;
                    nk.extend_from_slice(&k[src..src + len * d]);
                    nv.extend_from_slice(&v[src..src + len * d]);
                }
                st.keys[layer] = nk;
                st.values[layer] = nv;
            }
        }
        let step = self.step;
        for key in &keys {
            if let Some(st) = self.states.get_mut(key) {
                st.len += s;
                st.last_used = step;
            }
        }
        let vocab = self.manifest.vocab_size;
        let (_, all) = outputs["logits"].try_extract_tensor::<f32>().map_err(err)?;
        if all.len() != b * s * vocab {
            return Err(format!(
                "logits hold {} values, expected {b} x {s} x {vocab}",
                all.len()
            ));
        }
        Ok(chunks
            .iter()
            .enumerate()
            .map(|(row, c)| {
                let last = (row * s + s - 1) * vocab;
                c.want_logits.then(|| all[last..last + vocab].to_vec())
            })
            .collect())
    }

    /// Drops the K/V of sequences least recently stepped, beyond the declared capacity.
    /// Ended sequences are released as they end (`release`); what this catches is the
    /// K/V of preempted ones, which start over from position 0 when readmitted.
    fn evict(&mut self) {
        let capacity = self.capacity_blocks * BLOCK_SIZE;
        let mut held: usize = self.states.values().map(|s| s.len).sum();
        while held > capacity {
            let Some((&oldest, _)) = self
                .states
                .iter()
                .filter(|(_, s)| s.last_used < self.step)
                .min_by_key(|(_, s)| s.last_used)
            else {
                break;
            };
            if let Some(s) = self.states.remove(&oldest) {
                held -= s.len;
            }
        }
    }
}

impl ModelRuntime for OnnxRuntime {
    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            backend: "onnx",
            device: "cpu (ONNX Runtime)".into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kv: KvStorage::Internal,
            device_sampling: false,
            token_mask: false,
        }
    }

    fn vocab_size(&self) -> usize {
        self.manifest.vocab_size
    }

    fn context_length(&self) -> usize {
        self.manifest.context_length
    }

    fn kv_capacity(&self) -> KvCapacity {
        let m = &self.manifest;
        KvCapacity {
            blocks: self.capacity_blocks,
            bytes_per_token: m.n_layers * 2 * m.n_kv_heads * m.head_dim * 4,
        }
    }

    fn step(&mut self, batch: &[SeqChunk<'_>], sample: &mut dyn FnMut(&[f32], &dyn RowRunner)) {
        self.step += 1;
        // Decodes run together as one batch; prefill chunks one by one.
        let (decodes, others): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| self.decodes(&batch[i]));
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; batch.len()];
        // A failed run is a bug or a broken model file: the engine's supervisor fails
        // the requests in flight and restarts the loop.
        let failed = |e: String| -> ! { panic!("ONNX Runtime step failed: {e}") };
        let groups = (!decodes.is_empty())
            .then_some(decodes)
            .into_iter()
            .chain(others.into_iter().map(|i| vec![i]));
        for group in groups {
            let chunks: Vec<&SeqChunk<'_>> = group.iter().map(|&i| &batch[i]).collect();
            let out = self.run(&chunks).unwrap_or_else(|e| failed(e));
            for (i, row) in group.into_iter().zip(out) {
                rows[i] = row;
            }
        }
        self.evict();
        let logits: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        sample(&logits, &SerialRows);
    }

    fn reset(&mut self) {
        self.states.clear();
    }

    fn release(&mut self, first_block: BlockId) {
        self.states.remove(&first_block);
    }
}
