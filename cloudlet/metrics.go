package cloudlet

import (
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cloudletfs/cloudletfs/store"
)

// metrics are the service's Prometheus metrics: histograms observed as
// VMs move through their journey, and gauges and counters read from the
// VMs' latest reports at each scrape.
type metrics struct {
	s   *Service
	reg *prometheus.Registry

	requests      prometheus.Counter
	resume        prometheus.Histogram // request → QEMU running
	firstResponse prometheus.Histogram // request → first response
	demand        prometheus.Histogram // demand fetches of each VM that ended
	stall         prometheus.Histogram // stall time of each VM that ended
	ended         *prometheus.CounterVec

	seenMu sync.Mutex
	seen   map[string]observed

	cache cached[float64]

	vms          *prometheus.Desc
	bytesFetched *prometheus.Desc
	demandNow    *prometheus.Desc
	stallNow     *prometheus.Desc
	cacheHits    *prometheus.Desc
	failures     *prometheus.Desc
	progress     *prometheus.Desc
	cacheBytes   *prometheus.Desc
	resumedAt    *prometheus.Desc
	answeredAt   *prometheus.Desc
}

// observed says which of a VM's figures the histograms hold.
type observed struct{ resumed, answered, ended bool }

// Buckets in seconds: a VM on a LAN resumes in about a second; one on a
// slow link answers after minutes.
var secondBuckets = []float64{0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512}

func newMetrics(s *Service) *metrics {
	m := &metrics{s: s, reg: prometheus.NewRegistry(), seen: map[string]observed{}}
	m.requests = prometheus.NewCounter(prometheus.CounterOpts{Name: "cloudletfs_vm_requests_total", Help: "VMs admitted."})
	m.resume = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cloudletfs_vm_resume_seconds",
		Help: "Time from a VM's request to QEMU running it.", Buckets: secondBuckets})
	m.firstResponse = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cloudletfs_vm_first_response_seconds",
		Help: "Time from a VM's request to its application's first response.", Buckets: secondBuckets})
	m.demand = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cloudletfs_vm_demand_fetches_per_vm",
		Help: "Demand fetches (reads that jumped ahead of the stream) of each VM that ended.", Buckets: prometheus.ExponentialBuckets(1, 4, 10)})
	m.stall = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cloudletfs_vm_stall_seconds",
		Help: "Wall-clock time in which some read of a VM waited for the network, for each VM that ended.", Buckets: secondBuckets})
	m.ended = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cloudletfs_vm_ended_total", Help: "VMs that ended, by final state."}, []string{"state"})
	m.vms = prometheus.NewDesc("cloudletfs_vms", "VMs the cloudlet knows, by state.", []string{"state"}, nil)
	vm := []string{"vm"}
	m.bytesFetched = prometheus.NewDesc("cloudletfs_vm_fetched_bytes_total", "Bytes of a VM's overlay fetched over the network.", vm, nil)
	m.demandNow = prometheus.NewDesc("cloudletfs_vm_demand_fetches_total", "A VM's demand fetches so far.", vm, nil)
	m.stallNow = prometheus.NewDesc("cloudletfs_vm_stalled_seconds_total", "Wall-clock time in which some read of a VM waited, so far.", vm, nil)
	m.cacheHits = prometheus.NewDesc("cloudletfs_vm_cache_hit_segments", "Segments of a VM's overlay that were in the local cache, not fetched.", vm, nil)
	m.failures = prometheus.NewDesc("cloudletfs_vm_fetch_failures_total", "A VM's failed fetches by reason: error (an attempt failed), corrupt (sha256 mismatch), failed (given up on), timeout (a read's wait ran out).", []string{"vm", "reason"}, nil)
	m.progress = prometheus.NewDesc("cloudletfs_vm_overlay_present_ratio", "Share of a VM's overlay segments present.", vm, nil)
	m.resumedAt = prometheus.NewDesc("cloudletfs_vm_resumed_after_seconds", "Time from a VM's request to QEMU running it.", vm, nil)
	m.answeredAt = prometheus.NewDesc("cloudletfs_vm_first_response_after_seconds", "Time from a VM's request to its application's first response.", vm, nil)
	m.cacheBytes = prometheus.NewDesc("cloudletfs_cache_bytes", "Bytes the chunk caches of all overlays take in the state dir.", nil, nil)
	m.reg.MustRegister(m.requests, m.resume, m.firstResponse, m.demand, m.stall, m.ended, m)
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

func (m *metrics) requested() { m.requests.Inc() }

// transition observes what a VM reached since its last change: each
// histogram once per VM, whichever states it passed through.
func (m *metrics) transition(v VM, old State) {
	if v.State == old {
		return
	}
	m.seenMu.Lock()
	defer m.seenMu.Unlock()
	seen := m.seen[v.ID]
	if !seen.resumed {
		if at, ok := v.At("running"); ok {
			seen.resumed = true
			m.resume.Observe(at)
		}
	}
	if !seen.answered {
		if at, ok := v.At("first-response"); ok {
			seen.answered = true
			m.firstResponse.Observe(at)
		}
	}
	if v.State.Final() && !seen.ended {
		seen.ended = true
		m.ended.WithLabelValues(string(v.State)).Inc()
		if v.Stats != nil {
			m.demand.Observe(float64(v.Stats.DemandFetches))
			m.stall.Observe(v.Stats.StallMs / 1000)
		}
	}
	m.seen[v.ID] = seen
}

// Describe and Collect make the per-VM gauges a collector of their own:
// they are read from the latest reports at each scrape.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.vms, m.bytesFetched, m.demandNow, m.stallNow, m.cacheHits, m.failures, m.progress, m.cacheBytes, m.resumedAt, m.answeredAt} {
		ch <- d
	}
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	count := map[State]int{}
	for _, v := range m.s.List() {
		count[v.State]++
		if v.State.Final() {
			continue
		}
		if at, ok := v.At("running"); ok {
			ch <- prometheus.MustNewConstMetric(m.resumedAt, prometheus.GaugeValue, at, v.ID)
		}
		if at, ok := v.At("first-response"); ok {
			ch <- prometheus.MustNewConstMetric(m.answeredAt, prometheus.GaugeValue, at, v.ID)
		}
		st := v.Stats
		if st == nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(m.bytesFetched, prometheus.CounterValue, float64(st.BytesFetched), v.ID)
		ch <- prometheus.MustNewConstMetric(m.demandNow, prometheus.CounterValue, float64(st.DemandFetches), v.ID)
		ch <- prometheus.MustNewConstMetric(m.stallNow, prometheus.CounterValue, st.StallMs/1000, v.ID)
		hits := st.SegmentsPresent - int(st.SegmentsStreamed+st.SegmentsDemanded)
		ch <- prometheus.MustNewConstMetric(m.cacheHits, prometheus.GaugeValue, float64(max(0, hits)), v.ID)
		for reason, n := range map[string]int64{"error": st.FetchErrors, "corrupt": st.CorruptSegments, "failed": st.FailedFetches, "timeout": st.Timeouts} {
			ch <- prometheus.MustNewConstMetric(m.failures, prometheus.CounterValue, float64(n), v.ID, reason)
		}
		if st.Segments > 0 {
			ch <- prometheus.MustNewConstMetric(m.progress, prometheus.GaugeValue, float64(st.SegmentsPresent)/float64(st.Segments), v.ID)
		}
	}
	for _, s := range States {
		ch <- prometheus.MustNewConstMetric(m.vms, prometheus.GaugeValue, float64(count[s]), string(s))
	}
	if b, ok := m.cacheTotal(); ok {
		ch <- prometheus.MustNewConstMetric(m.cacheBytes, prometheus.GaugeValue, b)
	}
}

// cacheTotal sums the caches' sizes, as seen at most 10 s ago.
func (m *metrics) cacheTotal() (float64, bool) {
	v, err := m.cache.get(10*time.Second, func() (float64, error) {
		st, err := store.Open(m.s.opt.StateDir, m.s.log)
		if err != nil {
			return 0, err
		}
		defer st.Close()
		ents, err := st.Caches()
		if err != nil {
			return 0, err
		}
		var total int64
		for _, e := range ents {
			total += e.Bytes
		}
		return float64(total), nil
	})
	return v, err == nil
}

// forget drops what the histograms observed of a VM the service forgot.
func (m *metrics) forget(id string) {
	m.seenMu.Lock()
	defer m.seenMu.Unlock()
	delete(m.seen, id)
}
