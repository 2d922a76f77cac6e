package cloudlet

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"
	"golang.org/x/net/http/httpguts"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

// Options configure a cloudlet service.
type Options struct {
	StateDir string // the store: bases, caches, and the cloudlet's registry
	// HostAddr is the address the VMs' forwarded ports bind to: the
	// API's own, 127.0.0.1 by default.
	HostAddr string
	// Token, if set, must come with every API call as
	// "Authorization: Bearer TOKEN".
	Token string
	// OpenStatus serves the status page and /metrics without the token.
	OpenStatus bool
	// MaxMemory caps the guest RAM of the VMs that run at once; 0 is no
	// cap. MaxVMs caps their number; 0 is no cap.
	MaxMemory int64
	MaxVMs    int
	// AllowFile lets requests name file:// overlays on the cloudlet.
	AllowFile bool
	// Worker is the command that runs one VM; the VM's directory is
	// appended: `cloudletfs --state-dir D cloudlet-worker`.
	Worker       []string
	QEMU, Accel  string
	FetchTimeout time.Duration // per read; also bounds the header read at admission
	ProbeTimeout time.Duration
	CacheSize    int64
	// Advertise is this cloudlet's URL as other cloudlets reach it: a
	// handoff's destination fetches the layer from it. By default, the
	// URL the handoff was asked at.
	Advertise string
	Log       zerolog.Logger
}

// Service is a running cloudlet: the VMs it knows and the registry they
// are recorded in.
//
// Each VM is an entry. Its worker process owns the VM (mount and QEMU)
// and reports on it; the entry's monitor goroutine follows the reports
// and records each state change in the registry. Entries move:
//
//	admitted ──worker recorded, told "go"──▶ live ──worker's final report──▶ final
//	   │                                      │
//	   └── worker failed to start ────────────┴── worker died without one ──▶ failed (QEMU and dead mount cleaned up)
//
// A worker starts its VM only once the registry holds its PID and start
// time, so a daemon killed at any point leaves no VM the next one cannot
// find. Stop signals the worker once, on the move to Stopping, and waits
// on the entry's done channel, which the monitor closes once the entry is
// final; after 45 s it kills the worker, and the monitor then finds it
// dead within 15 s more. The monitor waits at most 100 ms between tries to
// reach a worker's socket and 30 s for a worker that sent its final report
// to exit. Close marks the service closing (Create then refuses), ends
// the monitors and the waits of Stop: workers run on, and the next service
// finds them by the PID and start time the registry holds.
//
// Locks: s.mu before e.mu, never the other way; neither is held across a
// wait on a worker.
type Service struct {
	opt Options
	reg *registry
	log zerolog.Logger

	ctx    context.Context // ends the monitors
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	vms     map[string]*entry
	closing bool

	metrics *metrics
	bases   cached[[]Base]
	// dropped are the handoffs whose source gave them up: no VM of one
	// may start here after.
	dropped map[string]bool

	// portsMu guards ports, the host ports given to VMs that have not
	// ended: two VMs that start together never get the same one. It is
	// taken last, under no other lock's wait.
	portsMu sync.Mutex
	ports   map[int]string // host port → VM ID
}

// cached is a value read at most every maxAge. While one caller reads it
// anew, the others get the value read before, if there is one, rather
// than wait.
type cached[T any] struct {
	mu   sync.Mutex
	val  T
	ok   bool
	at   time.Time
	busy chan struct{} // closed when the read under way ends; nil if none
}

func (c *cached[T]) get(maxAge time.Duration, read func() (T, error)) (T, error) {
	c.mu.Lock()
	for {
		if c.ok && time.Since(c.at) < maxAge {
			defer c.mu.Unlock()
			return c.val, nil
		}
		if c.busy == nil {
			break
		}
		if c.ok {
			defer c.mu.Unlock()
			return c.val, nil
		}
		busy := c.busy
		c.mu.Unlock()
		<-busy
		c.mu.Lock()
	}
	busy := make(chan struct{})
	c.busy = busy
	c.mu.Unlock()
	v, err := read()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy = nil
	close(busy)
	if err != nil {
		if c.ok {
			return c.val, nil
		}
		return v, err
	}
	c.val, c.ok, c.at = v, true, time.Now()
	return v, nil
}

// entry is one VM. mu guards rec and changed; changed is closed and
// replaced on every change, for the event streams.
type entry struct {
	mu      sync.Mutex
	rec     record
	changed chan struct{}
	done    chan struct{} // closed once final
	// stopAsked says the VM was asked to stop, stopAt when: a worker
	// that dies then has stopped it.
	stopAsked bool
	stopAt    time.Time
}

func (e *entry) snapshot() (VM, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	v := e.rec.VM
	v.Timeline = append([]Step(nil), v.Timeline...)
	v.Ports = append([]Port(nil), v.Ports...)
	return v, e.changed
}

// New opens the registry under opt.StateDir and finds the VMs an earlier
// service left: running ones are followed again, those whose worker died
// meanwhile are reported failed and cleaned up.
func New(opt Options) (*Service, error) {
	if opt.HostAddr == "" {
		opt.HostAddr = "127.0.0.1"
	}
	if opt.FetchTimeout <= 0 {
		opt.FetchTimeout = 30 * time.Second
	}
	if opt.ProbeTimeout <= 0 {
		opt.ProbeTimeout = 10 * time.Minute
	}
	if len(opt.Worker) == 0 {
		return nil, errors.New("cloudlet: no worker command")
	}
	if err := os.MkdirAll(filepath.Join(opt.StateDir, "cloudlet", "vms"), 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	reg, err := openRegistry(filepath.Join(opt.StateDir, "cloudlet", "db"))
	if err != nil {
		return nil, err
	}
	s := &Service{opt: opt, reg: reg, log: opt.Log, vms: map[string]*entry{}, ports: map[int]string{}, dropped: map[string]bool{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.metrics = newMetrics(s)
	recs, err := reg.all()
	if err != nil {
		reg.close()
		return nil, err
	}
	for _, r := range recs {
		e := &entry{rec: *r, changed: make(chan struct{}), done: make(chan struct{})}
		s.vms[r.VM.ID] = e
		if !r.VM.State.Final() {
			for _, p := range r.HostPorts {
				s.ports[p] = r.VM.ID
			}
		}
		switch {
		case r.VM.State.Final():
			close(e.done)
		case alive(r.WorkerPid, r.WorkerStart):
			s.log.Info().Str("vm", r.VM.ID).Int("worker_pid", r.WorkerPid).Msg("found a running VM again")
			s.follow(e, s.pollExit(r.WorkerPid, r.WorkerStart))
		default:
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.settle(e, "its worker process died while the cloudlet daemon was not running")
			}()
		}
	}
	return s, nil
}

// Close stops following the VMs and closes the registry. The VMs keep
// running.
func (s *Service) Close() error {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return s.reg.close()
}

// List returns every VM, oldest request first.
func (s *Service) List() []VM {
	s.mu.Lock()
	es := make([]*entry, 0, len(s.vms))
	for _, e := range s.vms {
		es = append(es, e)
	}
	s.mu.Unlock()
	out := make([]VM, 0, len(es))
	for _, e := range es {
		v, _ := e.snapshot()
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Requested.Equal(out[j].Requested) {
			return out[i].Requested.Before(out[j].Requested)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

func (s *Service) lookup(id string) *entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.vms[id]
}

// Bases lists the bases the cloudlet holds, as seen at most 5 s ago: the
// list needs the store's registry, which a base import or a VM starting
// may hold for a while, and a page or a scrape must not wait on it.
func (s *Service) Bases() ([]Base, error) {
	return s.bases.get(5*time.Second, s.readBases)
}

func (s *Service) readBases() ([]Base, error) {
	st, err := store.Open(s.opt.StateDir, s.log)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	bs, err := st.List()
	if err != nil {
		return nil, err
	}
	out := make([]Base, 0, len(bs))
	for _, b := range bs {
		out = append(out, Base{ID: b.ID.String(), Name: b.Name, DiskBytes: b.Disk.Size, MemoryBytes: b.Memory.Size, Runnable: b.VMConfig != nil})
	}
	return out, nil
}

// RequestError is a request the service refused; Status is the HTTP
// status that says why.
type RequestError struct {
	Status int
	Field  string
	Msg    string
}

func (e *RequestError) Error() string {
	if e.Field != "" {
		return e.Field + ": " + e.Msg
	}
	return e.Msg
}

func badRequest(field, format string, a ...any) error {
	return &RequestError{Status: 400, Field: field, Msg: fmt.Sprintf(format, a...)}
}

// Limits on a request, so that one request cannot take the daemon's
// memory.
const (
	maxPorts       = 16
	maxHeaders     = 32
	maxHeaderBytes = 8 << 10
	maxURLBytes    = 4 << 10
	maxPathBytes   = 1 << 10
)

// reserved are the headers the fetch sets or the transport owns.
var reserved = map[string]bool{"Range": true, "Host": true, "Content-Length": true, "Connection": true, "Transfer-Encoding": true}

// validate checks a request field by field.
func (s *Service) validate(r *Request) error {
	if r.Overlay == "" {
		return badRequest("overlay", "missing: give the overlay's URL (http://, https://, s3:// or file://)")
	}
	if len(r.Overlay) > maxURLBytes {
		return badRequest("overlay", "longer than %d bytes", maxURLBytes)
	}
	u, err := url.Parse(r.Overlay)
	if err != nil {
		return badRequest("overlay", "%s is not a valid URL", fetch.Redact(r.Overlay))
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return badRequest("overlay", "%s has no host", fetch.Redact(r.Overlay))
		}
	case "s3":
		if u.Host == "" || strings.Trim(u.Path, "/") == "" {
			return badRequest("overlay", "%s: want s3://BUCKET/KEY", fetch.Redact(r.Overlay))
		}
	case "file":
		if !s.opt.AllowFile {
			return badRequest("overlay", "file:// overlays are refused: this cloudlet was started without --allow-file")
		}
	case "":
		return badRequest("overlay", "%q has no scheme: want http://, https://, s3:// or file://", fetch.Redact(r.Overlay))
	default:
		return badRequest("overlay", "scheme %q is refused: want http, https, s3 or file", u.Scheme)
	}
	if len(r.Headers) > maxHeaders {
		return badRequest("headers", "more than %d", maxHeaders)
	}
	if len(r.Headers) > 0 && u.Scheme == "s3" {
		return badRequest("headers", "s3:// requests are signed with the cloudlet's AWS credentials; headers do not apply (a presigned https:// URL needs none either)")
	}
	n := 0
	for k, v := range r.Headers {
		n += len(k) + len(v)
		if !httpguts.ValidHeaderFieldName(k) {
			return badRequest("headers", "%q is not a header name", k)
		}
		if reserved[http.CanonicalHeaderKey(k)] {
			return badRequest("headers", "%s is set by the cloudlet itself", http.CanonicalHeaderKey(k))
		}
		if !httpguts.ValidHeaderFieldValue(v) {
			// The value may be a secret: do not echo it.
			return badRequest("headers", "the value of %s holds a line break or a control character", k)
		}
	}
	if n > maxHeaderBytes {
		return badRequest("headers", "more than %d bytes", maxHeaderBytes)
	}
	if len(r.Ports) > maxPorts {
		return badRequest("ports", "more than %d", maxPorts)
	}
	seen := map[int]bool{}
	for _, p := range r.Ports {
		if p < 1 || p > 65535 {
			return badRequest("ports", "%d is not a TCP port (1 to 65535)", p)
		}
		if seen[p] {
			return badRequest("ports", "%d is named twice", p)
		}
		seen[p] = true
	}
	if r.Handoff != "" {
		if !handoffID.MatchString(r.Handoff) {
			return badRequest("handoff", "want the 32 hex digits of a handoff's ID")
		}
		if _, err := os.Stat(s.stagedDir(r.Handoff)); err != nil {
			return badRequest("handoff", "no handoff %s was prepared here (POST /v1/handoffs)", r.Handoff)
		}
	}
	if r.From != "" {
		if _, err := NewClient(r.From, ""); err != nil {
			return badRequest("from", "want the source cloudlet's URL")
		}
	}
	if r.Probe != nil {
		if r.Probe.HTTP == "" {
			return badRequest("probe", `want {"http": "/path"}`)
		}
		p := r.Probe.HTTP
		if _, err := url.ParseRequestURI(p); err != nil || !strings.HasPrefix(p, "/") || len(p) > maxPathBytes || strings.ContainsFunc(p, func(c rune) bool { return c <= ' ' || c == 0x7f }) {
			return badRequest("probe.http", "want a path starting with / (at most %d bytes, no spaces or control characters)", maxPathBytes)
		}
	}
	return nil
}

// header reads the overlay's header: admission needs the guest's memory
// size and base before the VM is admitted.
func (s *Service) header(ctx context.Context, r *Request) (*overlay.Header, error) {
	h := http.Header{}
	for k, v := range r.Headers {
		h.Set(k, v)
	}
	src, err := fetch.OpenSource(r.Overlay, fetch.DefaultClient(nil), h)
	if err != nil {
		return nil, badRequest("overlay", "%v", err)
	}
	defer src.Close()
	ctx, cancel := context.WithTimeout(ctx, min(s.opt.FetchTimeout, 30*time.Second))
	defer cancel()
	b, err := src.ReadRange(ctx, 0, overlay.HeaderSize)
	if err != nil {
		msg := err.Error()
		if !strings.Contains(msg, src.String()) {
			msg = src.String() + ": " + msg
		}
		if fetch.Permanent(err) {
			return nil, badRequest("overlay", "%s", msg)
		}
		return nil, &RequestError{Status: 502, Field: "overlay", Msg: "could not read the overlay's header: " + msg}
	}
	hd, err := overlay.UnmarshalHeader(b)
	if err != nil {
		return nil, badRequest("overlay", "%s: %v", src, err)
	}
	return hd, nil
}

// Create admits a VM and starts its worker. It returns once the worker
// runs; the VM is synthesized in the background.
func (s *Service) Create(ctx context.Context, r Request) (VM, error) {
	if err := s.validate(&r); err != nil {
		return VM{}, err
	}
	shown := fetch.Redact(r.Overlay)
	h, err := s.header(ctx, &r)
	if err != nil {
		return VM{}, err
	}
	st, err := store.Open(s.opt.StateDir, s.log)
	if err != nil {
		return VM{}, err
	}
	base, err := st.Resolve(h.BaseID.String())
	st.Close()
	if err != nil {
		return VM{}, &RequestError{Status: 422, Field: "overlay", Msg: fmt.Sprintf("overlay %s needs base %s, which this cloudlet does not hold (GET /v1/bases lists those it does)", shown, h.BaseID.Short())}
	}
	if base.VMConfig == nil {
		return VM{}, &RequestError{Status: 422, Field: "overlay", Msg: fmt.Sprintf("base %s has no vm.json (it was imported, not made with `base create`), so this cloudlet cannot run VMs of it", base.Name)}
	}
	mem := h.ImageSize(overlay.Memory)
	oid := overlayID(h)

	id, err := newID()
	if err != nil {
		return VM{}, err
	}
	dir := filepath.Join(s.opt.StateDir, "cloudlet", "vms", id)
	now := time.Now()
	v := VM{ID: id, Overlay: shown, State: FetchingMetadata, Requested: now, Base: base.Name, MemoryBytes: mem,
		Timeline: []Step{{At: 0, Step: StepRequested, Text: fmt.Sprintf("requested %s (base %s, %s of RAM)", shown, base.Name, humanize.IBytes(uint64(mem)))}}}
	if r.Handoff != "" {
		// Known from the start: the source's DELETE finds it by this.
		v.Handoff = &Handoff{ID: r.Handoff, From: r.From, Phase: HandoffResuming, Timeline: []Step{}}
	}

	// Admission and the entry's insertion are one step: two requests
	// cannot both take the last room.
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return VM{}, &RequestError{Status: 503, Msg: "the cloudlet is shutting down: ask again once it is back"}
	}
	if r.Handoff != "" && s.dropped[r.Handoff] {
		return VM{}, &RequestError{Status: 409, Field: "handoff", Msg: fmt.Sprintf("handoff %s was given up by its source", r.Handoff)}
	}
	var used int64
	live := 0
	for _, e := range s.vms {
		e.mu.Lock()
		if !e.rec.VM.State.Final() {
			live++
			used += e.rec.VM.MemoryBytes
			if e.rec.OverlayID == oid {
				other := e.rec.VM.ID
				e.mu.Unlock()
				return VM{}, &RequestError{Status: 409, Field: "overlay", Msg: fmt.Sprintf("overlay %s already runs here as VM %s, and one overlay's data runs in one VM at a time: stop it first", shown, other)}
			}
		}
		e.mu.Unlock()
	}
	if s.opt.MaxVMs > 0 && live >= s.opt.MaxVMs {
		return VM{}, &RequestError{Status: 429, Msg: fmt.Sprintf("the cloudlet runs %d VMs, its limit (--max-vms): try again when one has stopped", live)}
	}
	if s.opt.MaxMemory > 0 && used+mem > s.opt.MaxMemory {
		return VM{}, &RequestError{Status: 507, Msg: fmt.Sprintf("the VM needs %s of RAM and the cloudlet has %s of its %s left (--max-memory): stop a VM, or ask another cloudlet",
			humanize.IBytes(uint64(mem)), humanize.IBytes(uint64(max(0, s.opt.MaxMemory-used))), humanize.IBytes(uint64(s.opt.MaxMemory)))}
	}
	fwd, err := s.givePorts(id, base, r.Ports)
	if err != nil {
		var re *RequestError
		if errors.As(err, &re) {
			return VM{}, err
		}
		return VM{}, &RequestError{Status: 503, Msg: err.Error()}
	}
	ok := false
	defer func() {
		if !ok {
			s.takePorts(id)
		}
	}()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return VM{}, err
	}
	sp := spec{VM: v, Request: r, StateDir: s.opt.StateDir, QEMU: s.opt.QEMU, Accel: s.opt.Accel, HostAddr: s.opt.HostAddr,
		Forwards: fwd, FetchTimeout: s.opt.FetchTimeout, ProbeTimeout: s.opt.ProbeTimeout, CacheSize: s.opt.CacheSize, AllowFile: s.opt.AllowFile}
	b, err := json.Marshal(sp)
	if err != nil {
		return VM{}, err
	}
	if err := writeAtomic(filepath.Join(dir, specFile), b, true); err != nil {
		return VM{}, err
	}
	e := &entry{rec: record{VM: v, OverlayID: oid, Dir: dir}, changed: make(chan struct{}), done: make(chan struct{})}
	for _, f := range fwd {
		e.rec.HostPorts = append(e.rec.HostPorts, f.HostPort)
	}
	if err := s.reg.put(&e.rec); err != nil {
		os.RemoveAll(dir)
		return VM{}, err
	}
	s.vms[id] = e
	s.metrics.requested()
	exited, err := s.startWorker(e)
	if err != nil {
		s.finalize(e, report{VM: failedVM(v, "could not start its worker: "+err.Error())})
		return VM{}, fmt.Errorf("starting the VM's worker: %w", err)
	}
	ok = true
	s.follow(e, exited)
	snap, _ := e.snapshot()
	s.log.Info().Str("vm", id).Str("overlay", shown).Str("base", base.Name).Msg("admitted a VM")
	return snap, nil
}

// givePorts picks the host ports of a new VM: one for each guest port
// asked for, or for the one the base's vm.json names, each free now and
// given to no other VM that runs.
func (s *Service) givePorts(id string, base *store.Base, guest []int) ([]qemu.Forward, error) {
	if len(guest) == 0 {
		cfg, _, err := launch.BaseConfig(base)
		if err != nil {
			return nil, &RequestError{Status: 422, Field: "overlay", Msg: fmt.Sprintf("base %s: %v: this cloudlet cannot run VMs of it", base.Name, err)}
		}
		if cfg.GuestPort == 0 || cfg.NIC == "" {
			return nil, nil
		}
		guest = []int{cfg.GuestPort}
	}
	s.portsMu.Lock()
	defer s.portsMu.Unlock()
	var fwd []qemu.Forward
	for _, g := range guest {
		p, err := 0, error(nil)
		for try := 0; try < 32; try++ {
			if p, err = launch.FreePortOn(s.opt.HostAddr); err != nil {
				break
			}
			if _, taken := s.ports[p]; !taken {
				break
			}
			p = 0
		}
		if err != nil || p == 0 {
			for _, f := range fwd {
				delete(s.ports, f.HostPort)
			}
			return nil, fmt.Errorf("no free port on %s for guest port %d: %v", s.opt.HostAddr, g, err)
		}
		s.ports[p] = id
		fwd = append(fwd, qemu.Forward{HostAddr: s.opt.HostAddr, HostPort: p, GuestPort: g})
	}
	return fwd, nil
}

// takePorts takes back the host ports of a VM that ended.
func (s *Service) takePorts(id string) {
	s.portsMu.Lock()
	defer s.portsMu.Unlock()
	for p, v := range s.ports {
		if v == id {
			delete(s.ports, p)
		}
	}
}

func failedVM(v VM, reason string) VM {
	v.State, v.Reason = Failed, reason
	v.Timeline = append(append([]Step(nil), v.Timeline...), Step{At: time.Since(v.Requested).Seconds(), Step: StepFailed, Text: reason})
	return v
}

func overlayID(h *overlay.Header) string {
	sum := sha256.Sum256(h.Marshal())
	return hex.EncodeToString(sum[:])
}

func newID() (string, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// startWorker starts the VM's worker in a session of its own, so that
// neither a signal to the daemon's process group nor the daemon's end
// reaches it, records its process, and only then tells it to go on. Its
// exit closes the returned channel.
func (s *Service) startWorker(e *entry) (<-chan struct{}, error) {
	logf, err := os.OpenFile(filepath.Join(e.rec.Dir, logFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args := append(append([]string(nil), s.opt.Worker[1:]...), e.rec.Dir)
	cmd := exec.Command(s.opt.Worker[0], args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	goAhead, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	defer goAhead.Close()
	qemu.CloseOnExec()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	start, _ := procStart(cmd.Process.Pid)
	e.mu.Lock()
	e.rec.WorkerPid, e.rec.WorkerStart = cmd.Process.Pid, start
	rec := e.rec
	e.mu.Unlock()
	exited := make(chan struct{})
	defer func() {
		go func() {
			cmd.Wait()
			close(exited)
		}()
	}()
	if err := s.reg.put(&rec); err != nil {
		// Closing the pipe unsaid ends the worker before it starts.
		return nil, fmt.Errorf("recording the VM's worker: %w", err)
	}
	// A worker that already ended cannot read it; the monitor then finds
	// it gone.
	io.WriteString(goAhead, "go\n")
	return exited, nil
}

// pollExit watches a worker the daemon did not start, and so cannot wait
// for.
func (s *Service) pollExit(pid int, start uint64) <-chan struct{} {
	exited := make(chan struct{})
	go func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for alive(pid, start) {
			select {
			case <-t.C:
			case <-s.ctx.Done():
				return // the worker runs on: exited stays open
			}
		}
		close(exited)
	}()
	return exited
}

// follow starts the entry's monitor: it applies the worker's reports
// until the worker ends, then settles the entry.
func (s *Service) follow(e *entry, exited <-chan struct{}) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			err := watch(s.ctx, e.rec.Dir, func(rep report) { s.apply(e, rep) })
			if s.ctx.Err() != nil {
				return
			}
			v, _ := e.snapshot()
			if v.State.Final() {
				break
			}
			select {
			case <-exited:
			case <-s.ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
				// Not listening yet, or a report cut: ask again.
				if err != nil {
					s.log.Debug().Err(err).Str("vm", v.ID).Msg("watching the VM's worker")
				}
				continue
			}
			break
		}
		// The worker writes its final report just before it exits.
		select {
		case <-exited:
		case <-s.ctx.Done():
			return
		case <-time.After(30 * time.Second):
			s.log.Warn().Str("vm", e.rec.VM.ID).Msg("the VM's worker sent its final report but did not exit; killing it")
			signal(e.rec.WorkerPid, e.rec.WorkerStart, syscall.SIGKILL)
			select {
			case <-exited:
			case <-s.ctx.Done():
				return
			}
		}
		if s.ctx.Err() != nil {
			return // the worker may run on: the next service follows it
		}
		s.settle(e, "its worker process died")
	}()
}

// apply takes a report of the worker's into the entry.
func (s *Service) apply(e *entry, rep report) {
	e.mu.Lock()
	if e.rec.VM.State.Final() {
		e.mu.Unlock()
		return
	}
	old := e.rec.VM.State
	if old == Stopping && !rep.VM.State.Final() {
		// A stop the daemon was asked for shows until the worker ends.
		rep.VM.State = Stopping
	}
	e.rec.VM = rep.VM
	rec := e.rec
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
	if rec.VM.State != old {
		s.metrics.transition(rec.VM, old)
		if err := s.reg.put(&rec); err != nil {
			s.log.Warn().Err(err).Str("vm", rec.VM.ID).Msg("recording the VM's state")
		}
	}
	if rec.VM.State.Final() {
		s.finalize(e, rep)
	}
}

// settle ends an entry whose worker is gone: by its final report if it
// wrote one, else as failed, with its QEMU and mount cleaned up.
func (s *Service) settle(e *entry, why string) {
	e.mu.Lock()
	final, stopAsked, stopAt := e.rec.VM.State.Final(), e.stopAsked, e.stopAt
	dir, v := e.rec.Dir, e.rec.VM
	v.Timeline = append([]Step(nil), v.Timeline...)
	e.mu.Unlock()
	if final {
		return
	}
	rep, err := readReport(dir)
	if err == nil && rep.VM.State.Final() {
		s.apply(e, rep)
		return
	}
	cleanup(dir, rep, s.log)
	if err == nil {
		v = rep.VM
	}
	if stopAsked {
		// Ended by the stop, if not as a worker ends a VM.
		if n := len(v.Timeline); n == 0 || v.Timeline[n-1].Step != string(Stopping) {
			v.Timeline = append(v.Timeline, Step{At: stopAt.Sub(v.Requested).Seconds(), Step: string(Stopping), Text: "stopping, as asked"})
		}
		v.State, v.Reason = Stopped, "stopped: its worker ended without its last report"
		v.Timeline = append(v.Timeline, Step{At: time.Since(v.Requested).Seconds(), Step: "stopped", Text: v.Reason})
		s.apply(e, report{VM: v})
		return
	}
	if last := lastLine(filepath.Join(dir, logFile)); last != "" {
		why += " (its log ends: " + last + ")"
	}
	s.apply(e, report{VM: failedVM(v, why+"; its console is in "+filepath.Join(dir, consoleFile)+" and its log in "+filepath.Join(dir, logFile))})
}

// lastLine returns the last line of a worker's log that says something.
func lastLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// finalize records a final entry and wakes those waiting for it.
func (s *Service) finalize(e *entry, rep report) {
	e.mu.Lock()
	if !e.rec.VM.State.Final() {
		old := e.rec.VM.State
		e.rec.VM = rep.VM
		close(e.changed)
		e.changed = make(chan struct{})
		s.metrics.transition(e.rec.VM, old)
	}
	rec := e.rec
	select {
	case <-e.done:
	default:
		close(e.done)
	}
	e.mu.Unlock()
	if err := s.reg.put(&rec); err != nil {
		s.log.Warn().Err(err).Str("vm", rec.VM.ID).Msg("recording the VM's end")
	}
	scrubSpec(rec.Dir)
	s.takePorts(rec.VM.ID)
	s.log.Info().Str("vm", rec.VM.ID).Str("state", string(rec.VM.State)).Str("reason", rec.VM.Reason).Msg("a VM ended")
	if h := rec.VM.Handoff; rec.VM.State == Moved && h != nil && h.Phase == HandoffComplete {
		// It runs on another cloudlet now, which has all of it: nothing
		// of it is left here. (One that may not have all of it keeps
		// the layer served until the VM is forgotten.) Not under s.mu,
		// which a caller may hold.
		go func() {
			if err := s.Remove(rec.VM.ID); err != nil {
				s.log.Warn().Err(err).Str("vm", rec.VM.ID).Msg("forgetting a VM handed off")
			}
		}()
	}
}

// scrubSpec drops the request's headers, which may be credentials, from
// the spec of a VM that ended; its worker, if it started, did so already.
func scrubSpec(dir string) {
	raw, err := os.ReadFile(filepath.Join(dir, specFile))
	if err != nil {
		return
	}
	var sp spec
	if json.Unmarshal(raw, &sp) != nil || len(sp.Request.Headers) == 0 {
		return
	}
	sp.Request.Headers = nil
	if b, err := json.Marshal(sp); err == nil {
		writeAtomic(filepath.Join(dir, specFile), b, true)
	}
}

// cleanup kills the QEMU of a worker that died and detaches its mount.
func cleanup(dir string, rep report, log zerolog.Logger) {
	mnt := filepath.Join(dir, mountDir)
	if rep.QEMUPid > 0 {
		// Only a QEMU that runs off this VM's mount: the PID may be
		// another process's by now.
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", rep.QEMUPid)); err == nil && strings.Contains(string(cmdline), mnt) {
			syscall.Kill(rep.QEMUPid, syscall.SIGKILL)
		}
	}
	// Only a dead mount: one whose FUSE server still answers belongs to
	// a process that runs.
	if t, _ := session.MountType(mnt); t == session.FSType && session.IsDead(mnt) {
		if err := session.CleanDead(mnt); err != nil {
			log.Warn().Err(err).Str("mountpoint", mnt).Msg("the mount of a VM whose worker died")
		}
	}
}

// Stop stops a VM and waits until it has stopped and its mount is gone.
func (s *Service) Stop(ctx context.Context, id string) (VM, error) {
	e := s.lookup(id)
	if e == nil {
		return VM{}, &RequestError{Status: 404, Msg: fmt.Sprintf("no VM %s on this cloudlet (GET /v1/vms lists them)", id)}
	}
	e.mu.Lock()
	final := e.rec.VM.State.Final()
	pid, start := e.rec.WorkerPid, e.rec.WorkerStart
	first := !final && !e.stopAsked
	if first {
		// The worker's report of the stop replaces this one.
		old := e.rec.VM.State
		e.stopAsked, e.stopAt = true, time.Now()
		e.rec.VM.State = Stopping
		close(e.changed)
		e.changed = make(chan struct{})
		s.metrics.transition(e.rec.VM, old)
	}
	e.mu.Unlock()
	if first {
		// Once: a second SIGTERM would end the worker in the middle of
		// its stop.
		signal(pid, start, syscall.SIGTERM)
	}
	if !final {
		shutdown := &RequestError{Status: 503, Msg: fmt.Sprintf("the cloudlet is shutting down; VM %s goes on stopping", id)}
		select {
		case <-e.done:
		case <-ctx.Done():
			return VM{}, ctx.Err()
		case <-s.ctx.Done():
			return VM{}, shutdown
		case <-time.After(45 * time.Second):
			s.log.Warn().Str("vm", id).Msg("the VM did not stop within 45 s; killing its worker")
			signal(pid, start, syscall.SIGKILL)
			select {
			case <-e.done:
			case <-s.ctx.Done():
				return VM{}, shutdown
			case <-time.After(15 * time.Second):
				return VM{}, fmt.Errorf("VM %s: its worker did not end after SIGKILL", id)
			}
		}
	}
	v, _ := e.snapshot()
	return v, nil
}

// Remove forgets a VM that has ended, and its directory.
func (s *Service) Remove(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.vms[id]
	if e == nil {
		return &RequestError{Status: 404, Msg: fmt.Sprintf("no VM %s on this cloudlet", id)}
	}
	v, _ := e.snapshot()
	if !v.State.Final() {
		return &RequestError{Status: 409, Msg: fmt.Sprintf("VM %s is %s: stop it first", id, v.State)}
	}
	if err := s.reg.remove(id); err != nil {
		return err
	}
	delete(s.vms, id)
	s.metrics.forget(id)
	return os.RemoveAll(e.rec.Dir)
}
