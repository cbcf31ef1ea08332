// ringwatch native hot path: a c10d Backend that records every call into the backend it wraps.
//
// The wrapper replaces a ProcessGroup's backend for one device type (CPU: Gloo). Every
// collective, point-to-point op and barrier reaching that backend -- from Python's
// torch.distributed functions and from C++ callers alike (DDP's reducer, functional
// collectives) -- is forwarded unchanged, and on the way one fixed-size record is written to a
// preallocated ring: op, group, sizes, root or peer, the backend's sequence counter before and
// after, the job's current step, and the monotonic issue time. Completion is written to a second
// ring by a C++ callback on the work's future (on the backend's own worker thread, no GIL), or,
// for send/recv whose works have no future, when the job waits on the work or sees it complete.
//
// Nothing on the calling thread allocates beyond the future callback, takes a lock, or touches
// Python. The rings are drained off the critical path by the agent's writer thread
// (`drain_issues`, `drain_ends`); a full ring drops the record and counts it.
//
// Memory order: a producer claims a cell with a CAS on the ring's head, fills it, and publishes
// it with a release store of the cell's tag; the single consumer reads a cell only after an
// acquire load shows its tag published (bounded MPMC queue after D. Vyukov, one consumer).

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace rw {

// Op codes; the Python side maps them to schema op names (keep the order in _native.py).
enum Op : int32_t {
  kAllReduce = 0,
  kAllReduceCoalesced,
  kAllReduceSparse,
  kBroadcast,
  kReduce,
  kAllGather,
  kAllGatherIntoTensor,
  kAllGatherCoalesced,
  kAllGatherIntoTensorCoalesced,
  kGather,
  kScatter,
  kReduceScatter,
  kReduceScatterTensor,
  kReduceScatterTensorCoalesced,
  kAllToAllSingle,
  kAllToAll,
  kSend,
  kRecv,
  kRecvAny,
  kBarrier,
  kMonitoredBarrier,
  kCoalesceStart,
  kCoalesceEnd,
  kMonitoredDone,  // a monitored barrier returned: the counter's movement during it
};

constexpr uint32_t kAsync = 1u;        // the caller asked for an asynchronous op
constexpr uint32_t kThrew = 2u;        // the backend call raised; no end will follow
constexpr uint32_t kEndFollows = 4u;   // an end record will come (future or wait)
constexpr uint32_t kInBatch = 8u;      // issued inside a coalescing block
constexpr uint32_t kBlocking = 16u;    // a send/recv from dist.send/dist.recv (marked, below)

// One issued op. 80 bytes.
struct Issue {
  int64_t mono_issue_ns;
  int64_t step;
  int64_t seq_before;
  int64_t seq_after;
  int64_t nbytes_in;
  int64_t nbytes_out;
  int64_t numel;
  int32_t op;
  int32_t group;
  int32_t peer;   // group rank of the peer (send/recv), else -1
  int32_t root;   // group rank of the root (rooted collectives), else -1
  int32_t dtype;  // c10::ScalarType, or -1
  uint32_t flags;
};

// One completion. 40 bytes.
struct End {
  uint64_t id;  // the Issue's position in its ring
  int64_t mono_end_ns;
  int64_t mono_wait_ns;  // when the job started waiting on it (wait ends), else -1
  int64_t wait_gap_ns;   // from the work's return to the caller to that wait, else -1
  int32_t status;        // 0 ok, 1 error
  int32_t source;        // 0 future, 1 wait, 2 seen complete
  int32_t peer;          // group rank of the sender of a receive from any source, else -1
  int32_t pad;
};

constexpr int32_t kSourceFuture = 0;
constexpr int32_t kSourceWait = 1;
constexpr int32_t kSourcePoll = 2;

inline int64_t mono_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <class T>
class Ring {
 public:
  explicit Ring(uint64_t capacity_pow2) : cells_(new Cell[capacity_pow2]), mask_(capacity_pow2 - 1) {
    for (uint64_t i = 0; i < capacity_pow2; ++i) {
      cells_[i].tag.store(i, std::memory_order_relaxed);
    }
  }

  // Claim a cell; nullptr when full (the record is dropped and counted).
  T* claim(uint64_t* pos_out) {
    uint64_t pos = head_.load(std::memory_order_relaxed);
    for (;;) {
      Cell& c = cells_[pos & mask_];
      uint64_t tag = c.tag.load(std::memory_order_acquire);
      int64_t dif = static_cast<int64_t>(tag) - static_cast<int64_t>(pos);
      if (dif == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          *pos_out = pos;
          return &c.value;
        }
      } else if (dif < 0) {
        dropped_.fetch_add(1, std::memory_order_relaxed);
        return nullptr;
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  void publish(uint64_t pos) {
    cells_[pos & mask_].tag.store(pos + 1, std::memory_order_release);
  }

  // Single consumer: copy up to max published values, in order, with their positions.
  size_t drain(T* out, uint64_t* ids, size_t max) {
    size_t n = 0;
    while (n < max) {
      Cell& c = cells_[tail_ & mask_];
      if (c.tag.load(std::memory_order_acquire) != tail_ + 1) {
        break;
      }
      out[n] = c.value;
      if (ids != nullptr) {
        ids[n] = tail_;
      }
      c.tag.store(tail_ + mask_ + 1, std::memory_order_release);
      ++tail_;
      ++n;
    }
    return n;
  }

  uint64_t dropped() const {
    return dropped_.load(std::memory_order_relaxed);
  }

  uint64_t capacity() const {
    return mask_ + 1;
  }

 private:
  struct Cell {
    std::atomic<uint64_t> tag;
    T value;
  };
  std::unique_ptr<Cell[]> cells_;
  const uint64_t mask_;
  alignas(64) std::atomic<uint64_t> head_{0};
  alignas(64) uint64_t tail_ = 0;
  std::atomic<uint64_t> dropped_{0};
};

struct Rings {
  Ring<Issue> issues;
  Ring<End> ends;
  std::mutex drain_mu;  // one drainer at a time (the writer thread; a final flush)
  explicit Rings(uint64_t cap) : issues(cap), ends(cap) {}
};

std::atomic<Rings*> g_rings{nullptr};
std::atomic<int64_t> g_step{INT64_MIN};
thread_local bool t_blocking_p2p = false;  // inside dist.send/dist.recv (mark_blocking)

// The flags of a send/recv issued now: blocking inside dist.send/dist.recv (the mark is used
// once), else asynchronous.
inline uint32_t p2p_flags() {
  if (t_blocking_p2p) {
    t_blocking_p2p = false;
    return kBlocking;
  }
  return kAsync;
}
std::atomic<uint64_t> g_ends_dropped_no_ring{0};

void push_end(uint64_t id, int32_t status, int32_t source, int64_t wait_ns = -1,
              int64_t gap_ns = -1, int32_t peer = -1) {
  Rings* r = g_rings.load(std::memory_order_acquire);
  if (r == nullptr) {
    g_ends_dropped_no_ring.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  uint64_t pos;
  End* e = r->ends.claim(&pos);
  if (e == nullptr) {
    return;
  }
  e->id = id;
  e->mono_end_ns = mono_ns();
  e->mono_wait_ns = wait_ns;
  e->wait_gap_ns = gap_ns;
  e->peer = peer;
  e->pad = 0;
  e->status = status;
  e->source = source;
  r->ends.publish(pos);
}

// Sizes of a tensor list / list of lists.
inline void add_sizes(const at::Tensor& t, int64_t* nbytes, int64_t* numel, int32_t* dtype) {
  int64_t n = t.numel();
  *numel += n;
  *nbytes += n * static_cast<int64_t>(t.element_size());
  if (*dtype < 0) {
    *dtype = static_cast<int32_t>(t.scalar_type());
  }
}

inline void sizes_of(const at::Tensor& t, int64_t* nbytes, int64_t* numel, int32_t* dtype) {
  add_sizes(t, nbytes, numel, dtype);
}

inline void sizes_of(const std::vector<at::Tensor>& ts, int64_t* nbytes, int64_t* numel,
                     int32_t* dtype) {
  for (const auto& t : ts) {
    add_sizes(t, nbytes, numel, dtype);
  }
}

inline void sizes_of(const std::vector<std::vector<at::Tensor>>& tss, int64_t* nbytes,
                     int64_t* numel, int32_t* dtype) {
  for (const auto& ts : tss) {
    sizes_of(ts, nbytes, numel, dtype);
  }
}

// Input and output sizes of one call; ``numel`` is the larger side's.
template <class In, class Out>
inline void io_sizes(Issue* rec, const In& in, const Out& out) {
  int64_t n_out = 0;
  sizes_of(in, &rec->nbytes_in, &rec->numel, &rec->dtype);
  sizes_of(out, &rec->nbytes_out, &n_out, &rec->dtype);
  rec->numel = std::max(rec->numel, n_out);
}

// A send/recv work (Gloo's have no future): records its end when the job waits on it or first
// sees it complete, and otherwise behaves exactly as the work it wraps.
class TimedWork : public c10d::Work {
 public:
  TimedWork(c10::intrusive_ptr<c10d::Work> inner, uint64_t id, bool any_source = false)
      : c10d::Work(-1, c10d::OpType::UNKNOWN),
        inner_(std::move(inner)),
        id_(id),
        returned_ns_(mono_ns()),
        any_source_(any_source) {}

  bool isCompleted() override {
    bool done = inner_->isCompleted();
    if (done) {
      end(inner_->isSuccess() ? 0 : 1, kSourcePoll);
    }
    return done;
  }
  bool isSuccess() const override { return inner_->isSuccess(); }
  std::exception_ptr exception() const override { return inner_->exception(); }
  int sourceRank() const override { return inner_->sourceRank(); }
  std::vector<at::Tensor> result() override { return inner_->result(); }
  void synchronize() override { inner_->synchronize(); }
  bool wait(std::chrono::milliseconds timeout) override {
    int64_t began = mono_ns();
    bool ok;
    try {
      ok = inner_->wait(timeout);
    } catch (...) {
      end(1, kSourceWait, began);
      throw;
    }
    end(0, kSourceWait, began);
    return ok;
  }
  void blockCurrentStream() override { inner_->blockCurrentStream(); }
  void abort() override { inner_->abort(); }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return inner_->getFuture(); }
  float getDuration() const override { return inner_->getDuration(); }
  uint64_t getSequencenumber() const override { return inner_->getSequencenumber(); }

 private:
  void end(int32_t status, int32_t source, int64_t wait_ns = -1) {
    bool expected = false;
    if (id_ != UINT64_MAX && ended_.compare_exchange_strong(expected, true)) {
      int32_t peer = -1;
      if (any_source_ && status == 0) {
        try {
          peer = inner_->sourceRank();
        } catch (...) {
          peer = -1;
        }
      }
      push_end(id_, status, source, wait_ns, wait_ns < 0 ? -1 : wait_ns - returned_ns_, peer);
    }
  }
  c10::intrusive_ptr<c10d::Work> inner_;
  uint64_t id_;
  int64_t returned_ns_;
  bool any_source_;
  std::atomic<bool> ended_{false};
};

class RecordingBackend : public c10d::Backend {
 public:
  RecordingBackend(c10::intrusive_ptr<c10d::Backend> inner, int32_t group)
      : c10d::Backend(inner->getRank(), inner->getSize()), inner_(std::move(inner)), group_(group) {}

  const c10::intrusive_ptr<c10d::Backend>& inner() const { return inner_; }

  // ---- the recording --------------------------------------------------------------------
  struct Pending {
    Issue* rec = nullptr;
    uint64_t pos = 0;
    Rings* rings = nullptr;
  };

  Pending begin(int32_t op, uint32_t flags) {
    Pending p;
    Rings* r = g_rings.load(std::memory_order_acquire);
    if (r == nullptr) {
      return p;
    }
    Issue* rec = r->issues.claim(&p.pos);
    if (rec == nullptr) {
      return p;
    }
    p.rec = rec;
    p.rings = r;
    rec->mono_issue_ns = mono_ns();
    rec->step = g_step.load(std::memory_order_relaxed);
    rec->seq_before = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
    rec->seq_after = -1;
    rec->nbytes_in = rec->nbytes_out = rec->numel = 0;
    rec->op = op;
    rec->group = group_;
    rec->peer = rec->root = rec->dtype = -1;
    rec->flags = flags | (in_batch_ ? kInBatch : 0u);
    return p;
  }

  // Publish the record once the backend call returned; arrange for its end.
  c10::intrusive_ptr<c10d::Work> finish(Pending& p, c10::intrusive_ptr<c10d::Work> work,
                                        bool p2p) {
    if (p.rec == nullptr) {
      return work;
    }
    p.rec->seq_after = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
    uint64_t id = p.pos;
    if (work && !in_batch_) {
      if (p2p) {
        p.rec->flags |= kEndFollows;
        bool any = p.rec->op == kRecvAny;
        p.rings->issues.publish(p.pos);
        return c10::make_intrusive<TimedWork>(std::move(work), id, any);
      }
      p.rec->flags |= kEndFollows;
      p.rings->issues.publish(p.pos);
      c10::intrusive_ptr<c10::ivalue::Future> fut;
      try {
        fut = work->getFuture();  // some Gloo works have none (it throws): timed on wait
      } catch (...) {
        return c10::make_intrusive<TimedWork>(std::move(work), id);
      }
      fut->addCallback(
          [id](c10::ivalue::Future& f) { push_end(id, f.hasError() ? 1 : 0, kSourceFuture); });
      return work;
    }
    if (in_batch_) {
      batch_.push_back(id);
      p.rec->flags |= kEndFollows;
    }
    p.rings->issues.publish(p.pos);
    return work;
  }

  void failed(Pending& p) {
    if (p.rec != nullptr) {
      p.rec->seq_after = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
      p.rec->flags |= kThrew;
      p.rings->issues.publish(p.pos);
    }
  }

  template <class F>
  c10::intrusive_ptr<c10d::Work> run(Pending& p, bool p2p, F&& call) {
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = call();
    } catch (...) {
      failed(p);
      throw;
    }
    return finish(p, std::move(work), p2p);
  }

  static uint32_t async_flag(bool async_op) { return async_op ? kAsync : 0u; }

  // ---- collectives ------------------------------------------------------------------------
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    Pending p = begin(kBroadcast, async_flag(opts.asyncOp));
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_in, &p.rec->numel, &p.rec->dtype);
      p.rec->nbytes_out = p.rec->nbytes_in;
      p.rec->root = static_cast<int32_t>(opts.rootRank);
    }
    return run(p, false, [&] { return inner_->broadcast(tensors, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    Pending p = begin(kAllReduce, async_flag(opts.asyncOp));
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_in, &p.rec->numel, &p.rec->dtype);
      p.rec->nbytes_out = p.rec->nbytes_in;
    }
    return run(p, false, [&] { return inner_->allreduce(tensors, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts) override {
    Pending p = begin(kAllReduceSparse, async_flag(opts.asyncOp));
    return run(p, false, [&] { return inner_->allreduce_sparse(tensors, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override {
    Pending p = begin(kAllReduceCoalesced, async_flag(opts.asyncOp));
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_in, &p.rec->numel, &p.rec->dtype);
      p.rec->nbytes_out = p.rec->nbytes_in;
    }
    return run(p, false, [&] { return inner_->allreduce_coalesced(tensors, opts); });
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override {
    Pending p = begin(kReduce, async_flag(opts.asyncOp));
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_in, &p.rec->numel, &p.rec->dtype);
      p.rec->nbytes_out = p.rec->nbytes_in;
      p.rec->root = static_cast<int32_t>(opts.rootRank);
    }
    return run(p, false, [&] { return inner_->reduce(tensors, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override {
    Pending p = begin(kAllGather, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false, [&] { return inner_->allgather(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override {
    Pending p = begin(kAllGatherIntoTensor, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, input, output);
    return run(p, false, [&] { return inner_->_allgather_base(output, input, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override {
    Pending p = begin(kAllGatherCoalesced, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false, [&] { return inner_->allgather_coalesced(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override {
    Pending p = begin(kAllGatherIntoTensorCoalesced, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false,
               [&] { return inner_->allgather_into_tensor_coalesced(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override {
    Pending p = begin(kGather, async_flag(opts.asyncOp));
    if (p.rec) {
      io_sizes(p.rec, inputs, outputs);
      p.rec->root = static_cast<int32_t>(opts.rootRank);
    }
    return run(p, false, [&] { return inner_->gather(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override {
    Pending p = begin(kScatter, async_flag(opts.asyncOp));
    if (p.rec) {
      io_sizes(p.rec, inputs, outputs);
      p.rec->root = static_cast<int32_t>(opts.rootRank);
    }
    return run(p, false, [&] { return inner_->scatter(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override {
    Pending p = begin(kReduceScatter, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false, [&] { return inner_->reduce_scatter(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override {
    Pending p = begin(kReduceScatterTensor, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, input, output);
    return run(p, false, [&] { return inner_->_reduce_scatter_base(output, input, opts); });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override {
    Pending p = begin(kReduceScatterTensorCoalesced, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false,
               [&] { return inner_->reduce_scatter_tensor_coalesced(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits,
                                               std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions& opts) override {
    Pending p = begin(kAllToAllSingle, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, input, output);
    return run(p, false, [&] {
      return inner_->alltoall_base(output, input, output_splits, input_splits, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override {
    Pending p = begin(kAllToAll, async_flag(opts.asyncOp));
    if (p.rec) io_sizes(p.rec, inputs, outputs);
    return run(p, false, [&] { return inner_->alltoall(outputs, inputs, opts); });
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override {
    Pending p = begin(kBarrier, async_flag(opts.asyncOp));
    return run(p, false, [&] { return inner_->barrier(opts); });
  }

  // Blocks inside the backend (the only call that does): published before the call, so a
  // barrier that never returns is seen in flight (a hang); how far the counter moved during it
  // comes after it returns, in a marker.
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override {
    Pending p = begin(kMonitoredBarrier, kEndFollows);
    int64_t before = -1;
    uint64_t id = UINT64_MAX;
    if (p.rec != nullptr) {
      before = p.rec->seq_before;
      id = p.pos;
      p.rings->issues.publish(p.pos);  // the cell is the consumer's from here on
    }
    int32_t status = 0;
    try {
      inner_->monitoredBarrier(opts, wait_all_ranks);
    } catch (...) {
      status = 1;
      done(before, id, status);
      throw;
    }
    done(before, id, status);
  }

  void done(int64_t before, uint64_t id, int32_t status) {
    Pending d = begin(kMonitoredDone, 0u);
    if (d.rec != nullptr) {
      d.rec->seq_before = before;
      d.rec->seq_after = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
      d.rings->issues.publish(d.pos);
    }
    if (id != UINT64_MAX) {
      push_end(id, status, kSourceWait);
    }
  }

  // ---- point to point -----------------------------------------------------------------------
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst, int tag) override {
    Pending p = begin(kSend, p2p_flags());
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_in, &p.rec->numel, &p.rec->dtype);
      p.rec->peer = dst;
    }
    return run(p, true, [&] { return inner_->send(tensors, dst, tag); });
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src, int tag) override {
    Pending p = begin(kRecv, p2p_flags());
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_out, &p.rec->numel, &p.rec->dtype);
      p.rec->peer = src;
    }
    return run(p, true, [&] { return inner_->recv(tensors, src, tag); });
  }

  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override {
    Pending p = begin(kRecvAny, p2p_flags());
    if (p.rec) {
      sizes_of(tensors, &p.rec->nbytes_out, &p.rec->numel, &p.rec->dtype);
    }
    return run(p, true, [&] { return inner_->recvAnysource(tensors, tag); });
  }

  // ---- coalescing ---------------------------------------------------------------------------
  void startCoalescing() override {
    inner_->startCoalescing();
    Pending p = begin(kCoalesceStart, 0u);
    in_batch_ = true;
    batch_.clear();
    if (p.rec) {
      p.rec->seq_after = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
      p.rings->issues.publish(p.pos);
    }
  }

  c10::intrusive_ptr<c10d::Work> endCoalescing() override {
    in_batch_ = false;
    std::vector<uint64_t> ids;
    ids.swap(batch_);
    Pending p = begin(kCoalesceEnd, 0u);
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = inner_->endCoalescing();
    } catch (...) {
      failed(p);
      for (uint64_t id : ids) {
        push_end(id, 1, kSourceWait);
      }
      throw;
    }
    if (p.rec != nullptr) {
      p.rec->seq_after = static_cast<int64_t>(inner_->getSequenceNumberForGroup());
      p.rings->issues.publish(p.pos);
    }
    if (!work) {
      for (uint64_t id : ids) {
        push_end(id, 0, kSourcePoll);
      }
      return work;
    }
    try {
      work->getFuture()->addCallback([ids](c10::ivalue::Future& f) {
        int32_t status = f.hasError() ? 1 : 0;
        for (uint64_t id : ids) {
          push_end(id, status, kSourceFuture);
        }
      });
    } catch (...) {
      auto timed = c10::make_intrusive<TimedWork>(work, ids.empty() ? UINT64_MAX : ids.back());
      for (size_t i = 0; i + 1 < ids.size(); ++i) {
        push_end(ids[i], 0, kSourcePoll);
      }
      return timed;
    }
    return work;
  }

  // ---- everything else goes to the wrapped backend unchanged ------------------------------
  bool supportsSplitting() const override { return inner_->supportsSplitting(); }
  bool supportsCoalescing() const override { return inner_->supportsCoalescing(); }
  bool supportsTimeEstimation() const override { return inner_->supportsTimeEstimation(); }
  bool supportsShrinking() const override { return inner_->supportsShrinking(); }
  void setTimeout(std::chrono::milliseconds timeout) override { inner_->setTimeout(timeout); }
  const std::string getBackendName() const override { return inner_->getBackendName(); }
  c10::intrusive_ptr<Options> getBackendOptions() override { return inner_->getBackendOptions(); }
  void setSequenceNumberForGroup() override { inner_->setSequenceNumberForGroup(); }
  uint64_t getSequenceNumberForGroup() override { return inner_->getSequenceNumberForGroup(); }
  void registerOnCompletionHook(std::function<void(std::shared_ptr<c10d::WorkInfo>)>&& hook) override {
    inner_->registerOnCompletionHook(std::move(hook));
  }
  void waitForPendingWorks() override { inner_->waitForPendingWorks(); }
  void enableCollectivesTiming() override { inner_->enableCollectivesTiming(); }
  c10::intrusive_ptr<c10d::Backend> split(const c10::intrusive_ptr<c10d::Store>& store,
                                          const std::vector<int>& ranks,
                                          const c10::intrusive_ptr<Options>& opts) override {
    return inner_->split(store, ranks, opts);
  }
  void setGroupUid(const std::string& pg_uid) override {
    c10d::Backend::setGroupUid(pg_uid);
    inner_->setGroupUid(pg_uid);
  }
  void eagerConnectSingleDevice(at::Device device) override {
    inner_->eagerConnectSingleDevice(device);
  }
  c10d::ErrorType getError() override { return inner_->getError(); }
  void abort() override { inner_->abort(); }
  void shutdown() override { inner_->shutdown(); }

 private:
  c10::intrusive_ptr<c10d::Backend> inner_;
  const int32_t group_;
  bool in_batch_ = false;  // coalescing is per group and per issuing thread in PyTorch
  std::vector<uint64_t> batch_;
};

// ---- access to a ProcessGroup's backend tables (protected members, reached through a
// pointer to member of a derived class: well-defined C++) ------------------------------------
struct PGAccess : c10d::ProcessGroup {
  using DevMap = std::unordered_map<c10::DeviceType, c10::intrusive_ptr<c10d::Backend>>;
  static DevMap& by_device(c10d::ProcessGroup& pg) { return pg.*(&PGAccess::deviceTypeToBackend_); }
};

// Wrap the group's CPU backend; True if it is wrapped now (or already was).
bool wrap_group(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, int64_t group) {
  auto& dev = PGAccess::by_device(*pg);
  auto it = dev.find(c10::DeviceType::CPU);
  c10::intrusive_ptr<c10d::Backend> inner;
  if (it != dev.end()) {
    inner = it->second;
  } else if (pg->hasBackendForDeviceType(c10::DeviceType::CPU)) {
    inner = pg->getBackend(c10::DeviceType::CPU);
  } else {
    return false;
  }
  if (dynamic_cast<RecordingBackend*>(inner.get()) != nullptr) {
    return true;
  }
  auto wrapper = c10::make_intrusive<RecordingBackend>(inner, static_cast<int32_t>(group));
  wrapper->setGroupUid(inner->getGroupUid());
  wrapper->setGroupDesc(inner->getGroupDesc());
  // Only the device table: ops are dispatched through it (getBackend(device), monitored
  // barriers included). The backend-type table keeps the real backend, because PyTorch
  // reaches it with static casts to the concrete class (DDP's logger reads Gloo's thread
  // count through getBackend(BackendType::GLOO)).
  dev[c10::DeviceType::CPU] = wrapper;
  return true;
}

// Put the original backend back (detach).
bool unwrap_group(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  bool any = false;
  auto restore = [&](auto& table) {
    for (auto& kv : table) {
      auto* w = dynamic_cast<RecordingBackend*>(kv.second.get());
      if (w != nullptr) {
        kv.second = w->inner();
        any = true;
      }
    }
  };
  restore(PGAccess::by_device(*pg));
  return any;
}

bool is_wrapped(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  auto& dev = PGAccess::by_device(*pg);
  auto it = dev.find(c10::DeviceType::CPU);
  return it != dev.end() && dynamic_cast<RecordingBackend*>(it->second.get()) != nullptr;
}

void start(int64_t capacity) {
  uint64_t cap = 1;
  while (cap < static_cast<uint64_t>(std::max<int64_t>(capacity, 2))) cap <<= 1;
  Rings* expected = nullptr;
  Rings* fresh = new Rings(cap);
  if (!g_rings.compare_exchange_strong(expected, fresh)) {
    delete fresh;  // already started
  }
}

void set_step(int64_t step) { g_step.store(step, std::memory_order_relaxed); }

// dist.send/dist.recv issue an isend/irecv and wait on it; the capture's thin wrappers of the
// two mark the calling thread around the call, so the record says "blocking" for sure instead
// of guessing from how soon the wait came (a thread that waits for the GIL on its way back
// from the backend comes late to its own wait).
void mark_blocking(bool on) { t_blocking_p2p = on; }

// Copy out the published records as raw bytes: (issues, their ids) and ends.
py::tuple drain(int64_t max_records) {
  Rings* r = g_rings.load(std::memory_order_acquire);
  if (r == nullptr) {
    return py::make_tuple(py::bytes(), py::bytes(), py::bytes());
  }
  size_t max = static_cast<size_t>(std::max<int64_t>(max_records, 1));
  std::vector<Issue> issues(max);
  std::vector<uint64_t> ids(max);
  std::vector<End> ends(max);
  size_t ni, ne;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(r->drain_mu);
    ni = r->issues.drain(issues.data(), ids.data(), max);
    ne = r->ends.drain(ends.data(), nullptr, max);
  }
  return py::make_tuple(
      py::bytes(reinterpret_cast<const char*>(issues.data()), ni * sizeof(Issue)),
      py::bytes(reinterpret_cast<const char*>(ids.data()), ni * sizeof(uint64_t)),
      py::bytes(reinterpret_cast<const char*>(ends.data()), ne * sizeof(End)));
}

py::dict counters() {
  py::dict d;
  Rings* r = g_rings.load(std::memory_order_acquire);
  d["issues_dropped"] = r ? r->issues.dropped() : 0;
  d["ends_dropped"] = (r ? r->ends.dropped() : 0) + g_ends_dropped_no_ring.load();
  d["capacity"] = r ? r->issues.capacity() : 0;
  return d;
}

py::dict layout() {
  py::dict d;
  d["issue_size"] = sizeof(Issue);
  d["end_size"] = sizeof(End);
  d["issue_fields"] = py::make_tuple(
      offsetof(Issue, mono_issue_ns), offsetof(Issue, step), offsetof(Issue, seq_before),
      offsetof(Issue, seq_after), offsetof(Issue, nbytes_in), offsetof(Issue, nbytes_out),
      offsetof(Issue, numel), offsetof(Issue, op), offsetof(Issue, group), offsetof(Issue, peer),
      offsetof(Issue, root), offsetof(Issue, dtype), offsetof(Issue, flags));
  d["end_fields"] = py::make_tuple(offsetof(End, id), offsetof(End, mono_end_ns),
                                   offsetof(End, mono_wait_ns), offsetof(End, wait_gap_ns),
                                   offsetof(End, status), offsetof(End, source),
                                   offsetof(End, peer));
  return d;
}

int64_t scalar_type_of(const at::Tensor& t) { return static_cast<int64_t>(t.scalar_type()); }

}  // namespace rw

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ringwatch native hot path: a recording c10d backend wrapper and its rings";
  m.def("wrap_group", &rw::wrap_group, "Record every call into the group's CPU backend");
  m.def("unwrap_group", &rw::unwrap_group, "Put the group's own backend back");
  m.def("is_wrapped", &rw::is_wrapped);
  m.def("start", &rw::start, "Allocate the rings (capacity rounded up to a power of two)");
  m.def("set_step", &rw::set_step);
  m.def("mark_blocking", &rw::mark_blocking,
        "Mark the calling thread's next send/recv as blocking (dist.send/dist.recv)");
  m.def("drain", &rw::drain, "Take the published issue and end records, as raw bytes");
  m.def("counters", &rw::counters);
  m.def("layout", &rw::layout);
  m.def("scalar_type_of", &rw::scalar_type_of);
  m.attr("STEP_NONE") = INT64_MIN;
}
