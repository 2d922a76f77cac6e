package cloudlet

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
)

// A VM's directory under <state dir>/cloudlet/vms/<id> holds:
const (
	specFile    = "spec.json"   // what the worker runs (0600: it holds the request's headers)
	statusFile  = "status.json" // the worker's last report, final once it has ended
	mountDir    = "mnt"         // the overlay's mount
	consoleFile = "console.log" // the guest's serial console
	logFile     = "worker.log"  // the worker's own log
)

// spec is what the daemon hands a worker.
type spec struct {
	VM       VM      `json:"vm"` // as admitted: ID, overlay, request time, timeline so far
	Request  Request `json:"request"`
	StateDir string  `json:"state_dir"`
	QEMU     string  `json:"qemu"`
	Accel    string  `json:"accel"`
	HostAddr string  `json:"host_addr"`
	// Forwards are the host ports the daemon gave the VM; without them
	// the worker asks the kernel for free ones itself.
	Forwards []qemu.Forward `json:"forwards,omitempty"`
	// Durations in nanoseconds.
	FetchTimeout time.Duration `json:"fetch_timeout"`
	ProbeTimeout time.Duration `json:"probe_timeout"`
	CacheSize    int64         `json:"cache_size"`
	AllowFile    bool          `json:"allow_file,omitempty"`
}

// report is what a worker says of its VM: what the API shows, and what
// the daemon needs to clean up after a worker that died.
type report struct {
	VM      VM  `json:"vm"`
	QEMUPid int `json:"qemu_pid,omitempty"`
}

// worker runs one VM and reports on it. Its reports go to subscribers of
// the socket and to the status file; the last one, written and synced
// before the worker exits, is final.
//
// mu guards the report and the flags; saveMu orders the writes of the
// status file, so that the file on disk is never older than a report
// subscribers saw. A subscriber that does not read blocks only its own
// connection, for at most watchWriteTimeout.
type worker struct {
	dir string
	log zerolog.Logger

	saveMu   sync.Mutex
	mu       sync.Mutex
	rep      report
	changed  chan struct{} // closed and replaced on every change
	ended    bool
	probed   bool // a probe was asked for
	answered bool // and it succeeded
	complete bool
	sess     *session.Session // once QEMU runs
	vm       *qemu.VM         // once QEMU runs

	sp      spec
	runCtx  context.Context
	stopRun context.CancelFunc // ends the launch: QEMU quits, the mount goes
	handing bool               // a handoff is under way
	moved   *handoffDone       // the handoff succeeded: the VM runs elsewhere
}

// RunWorker runs the VM described in dir until it ends or ctx does, and
// reports on it; `cloudletfs cloudlet-worker DIR` is this. It starts the
// VM only once the daemon has written "go" to registered, after recording
// the worker's process: a worker the registry does not name would run a
// VM no daemon can find. It is the daemon's child but not tied to it: a daemon that
// dies leaves it running, and the next daemon finds it again by the PID
// and start time the registry holds, and follows it on its socket. It
// returns once the final report is written.
func RunWorker(ctx context.Context, dir string, registered io.Reader, log zerolog.Logger) error {
	if line, _ := bufio.NewReader(registered).ReadString('\n'); line != "go\n" {
		return errors.New("worker: the cloudlet daemon did not record this worker, so it does not start the VM")
	}
	raw, err := os.ReadFile(filepath.Join(dir, specFile))
	if err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	var sp spec
	if err := json.Unmarshal(raw, &sp); err != nil {
		return fmt.Errorf("worker: %s: %w", specFile, err)
	}
	if len(sp.Request.Headers) > 0 {
		// The headers may be credentials: they live on in this process
		// only.
		kept := sp
		kept.Request.Headers = nil
		if b, err := json.Marshal(kept); err == nil {
			writeAtomic(filepath.Join(dir, specFile), b, true)
		}
	}
	w := &worker{dir: dir, log: log, rep: report{VM: sp.VM}, changed: make(chan struct{}), sp: sp}
	w.runCtx, w.stopRun = context.WithCancel(ctx)
	defer w.stopRun()
	if h := sp.Request.Handoff; h != "" {
		w.rep.VM.Handoff = &Handoff{ID: h, From: sp.Request.From, Phase: HandoffResuming, Timeline: []Step{}}
	}
	w.probed = sp.Request.Probe != nil && sp.Request.Probe.HTTP != ""
	ln, err := net.Listen("unix", socketAddr(dir))
	if err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	ln = sameUser{ln}
	srv := &http.Server{Handler: w.handler(), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()
	w.save(false)

	consoleF, err := os.OpenFile(filepath.Join(dir, consoleFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	defer consoleF.Close()
	console := &capped{w: consoleF, left: maxConsole}
	mnt := filepath.Join(dir, mountDir)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	var headers []string
	for k, v := range sp.Request.Headers {
		headers = append(headers, k+": "+v)
	}
	sort.Strings(headers)
	fwd := sp.Forwards
	for _, p := range sp.Request.Ports {
		if len(sp.Forwards) > 0 {
			break
		}
		fwd = append(fwd, qemu.Forward{HostAddr: sp.HostAddr, GuestPort: p})
	}
	if len(fwd) == 0 && len(sp.Forwards) == 0 {
		// vm.json's own guest port, on the cloudlet's address.
		fwd = append(fwd, qemu.Forward{HostAddr: sp.HostAddr})
	}
	var staged string
	if sp.Request.Handoff != "" {
		staged = filepath.Join(sp.StateDir, "cloudlet", "handoffs", sp.Request.Handoff)
	}
	opt := launch.Options{
		Session: session.Options{Overlay: sp.Request.Overlay, StateDir: sp.StateDir, Log: log,
			Headers: headers, FetchTimeout: sp.FetchTimeout, CacheSize: sp.CacheSize, Staged: staged, NetworkParents: !sp.AllowFile},
		Mountpoint: mnt, QEMU: sp.QEMU, Accel: sp.Accel, Forwards: fwd,
		ProbeTimeout: sp.ProbeTimeout, Console: console, Events: w.event, Running: w.running,
	}
	if w.probed {
		opt.ProbeHTTP = sp.Request.Probe.HTTP
	}
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		w.sample(stopSampling)
	}()
	runErr := launch.Run(w.runCtx, opt)
	close(stopSampling)
	<-sampled
	w.mu.Lock()
	moved := w.moved
	w.mu.Unlock()
	if moved != nil && ctx.Err() == nil {
		w.awaitComplete(ctx, moved)
		runErr = nil
	}
	w.finish(ctx, runErr)
	return runErr
}

// maxConsole bounds a VM's console log: a guest that prints without end
// must not fill the state dir.
const maxConsole = 16 << 20

// capped writes to w until left runs out, then drops what follows.
type capped struct {
	w    io.Writer
	left int64
}

func (c *capped) Write(p []byte) (int, error) {
	if c.left <= 0 {
		return len(p), nil
	}
	n := min(int64(len(p)), c.left)
	c.left -= n
	if c.left == 0 {
		c.w.Write(p[:n])
		io.WriteString(c.w, "\n[cloudletfs: the console log reached 16 MiB; the rest is not kept]\n")
		return len(p), nil
	}
	if _, err := c.w.Write(p[:n]); err != nil {
		return 0, err
	}
	return len(p), nil
}

// event turns a step of the launch into the VM's timeline and state.
func (w *worker) event(e launch.Event) {
	if e.Step == launch.StepComplete && w.sp.Request.Handoff != "" {
		// Every segment is in the cache: the staged ones are not needed.
		os.RemoveAll(filepath.Join(w.sp.StateDir, "cloudlet", "handoffs", w.sp.Request.Handoff))
	}
	w.update(func(r *report) {
		v := &r.VM
		if w.moved != nil && (e.Step == launch.StepStopping || e.Step == launch.StepStopped) {
			v.Timeline = append(v.Timeline, Step{At: time.Since(v.Requested).Seconds(), Step: string(e.Step), Text: "QEMU quit here: the VM runs on " + w.moved.to})
			return
		}
		v.Timeline = append(v.Timeline, Step{At: time.Since(v.Requested).Seconds(), Step: string(e.Step), Text: e.Text})
		if h := v.Handoff; h != nil && h.From != "" {
			switch e.Step {
			case launch.StepRunning:
				h.Phase = HandoffRunning
			case launch.StepComplete:
				h.Phase = HandoffComplete
			}
		}
		switch e.Step {
		case launch.StepMetadata:
			v.State = Resuming
		case launch.StepRunning:
			v.State = Running
			if w.complete && !w.probed {
				v.State = Complete
			}
		case launch.StepFirstResponse:
			w.answered = true
			v.State = FirstResponse
			if w.complete {
				v.State = Complete
			}
		case launch.StepComplete:
			w.complete = true
			if (w.answered || !w.probed) && v.State != Resuming {
				v.State = Complete
			}
		case launch.StepStopping:
			v.State = Stopping
			v.Timeline[len(v.Timeline)-1].Text = "stopping, as asked"
		}
	})
}

// running records where the VM can be reached and what to clean up.
func (w *worker) running(r launch.Running) {
	w.update(func(rep *report) {
		rep.QEMUPid = r.QEMUPid
		rep.VM.Ports = nil
		for _, f := range r.Forwards {
			rep.VM.Ports = append(rep.VM.Ports, Port{Guest: f.GuestPort, Host: net.JoinHostPort(f.HostAddr, fmt.Sprint(f.HostPort))})
		}
	})
	w.mu.Lock()
	w.sess, w.vm = r.Session, r.VM
	w.mu.Unlock()
}

// sample reports the overlay's progress every second while the VM runs.
func (w *worker) sample(stop <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-stop:
			w.progress()
			return
		case <-t.C:
			w.progress()
		}
	}
}

func (w *worker) progress() {
	w.mu.Lock()
	s := w.sess
	w.mu.Unlock()
	if s == nil {
		return
	}
	st := s.Fetcher.Stats()
	w.update(func(r *report) {
		r.VM.Stats = &st
		r.VM.Progress = &Progress{Segments: st.Segments, SegmentsPresent: st.SegmentsPresent,
			BytesFetched: st.BytesFetched, OverlayBytes: st.OverlayBytes, Complete: st.Complete}
	})
}

// finish writes the final report: stopped if the VM was stopped or ended
// well, failed with the reason otherwise.
func (w *worker) finish(ctx context.Context, runErr error) {
	w.update(func(r *report) {
		v := &r.VM
		switch {
		case runErr != nil && ctx.Err() == nil:
			v.State, v.Reason = Failed, oneLine(runErr.Error())
			v.Timeline = append(v.Timeline, Step{At: time.Since(v.Requested).Seconds(), Step: StepFailed, Text: v.Reason})
		case w.moved != nil:
			// It runs there, whether or not this worker saw it complete.
			v.State, v.Reason = Moved, fmt.Sprintf("handed off to %s as VM %s", w.moved.to, w.moved.vm)
		case ctx.Err() != nil:
			v.State, v.Reason = Stopped, "stopped as asked"
			if runErr != nil {
				v.Reason += " (" + oneLine(runErr.Error()) + ")"
			}
		default:
			v.State, v.Reason = Stopped, "the VM exited"
		}
		if n := len(v.Timeline); (v.State == Stopped || v.State == Moved) && (n == 0 || v.Timeline[n-1].Step != string(launch.StepStopped)) {
			v.Timeline = append(v.Timeline, Step{At: time.Since(v.Requested).Seconds(), Step: string(launch.StepStopped), Text: v.Reason})
		}
		r.QEMUPid = 0
		w.ended = true
	})
	w.save(true)
}

// oneLine puts an error on one line, its lines (QEMU's messages, the last
// console lines) joined by " | ", and at most maxReason bytes of it.
func oneLine(s string) string {
	var parts []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			parts = append(parts, l)
		}
	}
	out := strings.Join(parts, " | ")
	if len(out) > maxReason {
		out = out[:maxReason] + " …"
	}
	return out
}

// maxReason bounds the reason a VM failed with; its console log and the
// worker's log hold the rest.
const maxReason = 2000

func (w *worker) update(f func(r *report)) {
	w.mu.Lock()
	f(&w.rep)
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
	w.save(false)
}

// save writes the report to the status file, atomically, and syncs it
// when final.
func (w *worker) save(final bool) {
	w.saveMu.Lock()
	defer w.saveMu.Unlock()
	w.mu.Lock()
	b, err := json.Marshal(w.rep)
	w.mu.Unlock()
	if err == nil {
		err = writeAtomic(filepath.Join(w.dir, statusFile), b, final)
	}
	if err != nil {
		w.log.Warn().Err(err).Msg("writing the VM's status file")
	}
}

// handler serves GET /watch: one report a line, the current one first,
// then each change, until the final report.
func (w *worker) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /handoff", w.startHandoff)
	mux.HandleFunc("GET /watch", func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(rw)
		for {
			w.mu.Lock()
			b, err := json.Marshal(w.rep)
			changed, ended := w.changed, w.ended
			w.mu.Unlock()
			if err != nil {
				return
			}
			rc.SetWriteDeadline(time.Now().Add(watchWriteTimeout))
			if _, err := rw.Write(append(b, '\n')); err != nil {
				return
			}
			if rc.Flush() != nil || ended {
				return
			}
			select {
			case <-changed:
			case <-r.Context().Done():
				return
			}
		}
	})
	return mux
}

// watchWriteTimeout bounds a write of one report to a subscriber.
const watchWriteTimeout = 10 * time.Second

// sameUser accepts only connections of processes of this process's user:
// the abstract namespace has no file permissions.
type sameUser struct{ net.Listener }

func (l sameUser) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if peerIsUs(c) {
			return c, nil
		}
		c.Close()
	}
}

// peerIsUs reports whether the process at the other end of a unix socket
// runs as this process's user.
func peerIsUs(c net.Conn) bool {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || cerr != nil {
		return false
	}
	return int(cred.Uid) == os.Geteuid()
}

// socketAddr is where the worker of the VM in dir reports: a socket in
// the abstract namespace, named by the directory. A path would have to fit
// the 108 bytes of a socket address, and would outlive a worker killed.
// Anyone on the machine may connect; the reports hold nothing secret.
func socketAddr(dir string) string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		abs = dir
	}
	sum := sha256.Sum256([]byte(abs))
	return "@cloudletfs-vm-" + hex.EncodeToString(sum[:12])
}

// watch follows a worker's reports on its socket, calling f for each,
// until the stream ends or ctx does.
func watch(ctx context.Context, dir string, f func(report)) error {
	c := workerClient(dir)
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://worker/watch", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var rep report
		if err := json.Unmarshal(sc.Bytes(), &rep); err != nil {
			return fmt.Errorf("worker %s: %w", dir, err)
		}
		f(rep)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return nil
}

// workerClient talks to the worker of the VM in dir on its socket, as
// http://worker/.
func workerClient(dir string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", socketAddr(dir))
			if err == nil && !peerIsUs(conn) {
				// Another user's process took the name first.
				conn.Close()
				return nil, fmt.Errorf("the socket of worker %s belongs to another user", dir)
			}
			return conn, err
		},
	}}
}

// readReport reads a worker's last report from its status file.
func readReport(dir string) (report, error) {
	var rep report
	b, err := os.ReadFile(filepath.Join(dir, statusFile))
	if err != nil {
		return rep, err
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return rep, fmt.Errorf("%s: %w", filepath.Join(dir, statusFile), err)
	}
	return rep, nil
}

// writeAtomic replaces path with b: a reader sees the old file or the
// new one, never a part.
func writeAtomic(path string, b []byte, sync bool) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
