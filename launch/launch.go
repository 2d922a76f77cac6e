// Package launch is the VM journey on top of a session: it mounts an
// overlay, starts stock QEMU on the mounted disk, memory and state,
// resumes the VM as soon as the metadata has arrived, probes the guest,
// writes a timeline, and stops QEMU before the mount goes. Given the files
// of an extracted VM instead, it runs them the same way: the full
// synthesis baseline. It parses no flags; `cloudletfs launch` and a
// cloudlet service share it.
package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

// Options say what to run and how.
type Options struct {
	// Session mounts the overlay; its Mountpoint is made here, and Fresh
	// and Check are set here.
	Session session.Options
	// Dir, if set, is a directory `overlay extract` wrote, run instead of
	// a mount of Session.Overlay.
	Dir          string
	QEMU         string // the QEMU binary, checked
	Accel        string // kvm or tcg, resolved
	Extra        []string
	Probe        string // shell command that succeeds once the guest answers
	ProbeTimeout time.Duration
	// ExitAfterProbe stops the VM once the probe succeeded and the overlay
	// is complete.
	ExitAfterProbe bool
	Timeline       io.Writer // one line per step, timed from the start
	Console        io.Writer // the guest's serial console, or nil
	// Stopped, if set, runs once QEMU has stopped, while the mount is still
	// there (nil without one): to write its trace, for example.
	Stopped func(s *session.Session) error

	// Mountpoint, if set, is an existing empty directory to mount on;
	// otherwise the mount gets a temporary one.
	Mountpoint string
	// Forwards are the guest's TCP ports to reach from the host; a
	// HostPort of 0 takes a free port of HostAddr, and a GuestPort of 0
	// is the port vm.json names, if it names one. Without them, that
	// port is forwarded from a free port of 127.0.0.1.
	Forwards []qemu.Forward
	// ProbeHTTP, if set, is a path: the probe is a GET of it on the first
	// forwarded port, which succeeds on a 2xx reply. Probe, if also set,
	// runs instead.
	ProbeHTTP string
	// Events, if set, gets every step of the timeline as it happens,
	// besides the line written to Timeline.
	Events func(Event)
	// Running, if set, is called once QEMU has resumed the VM.
	Running func(Running)
}

// Step names a point of the journey.
type Step string

// The steps of a launch, in the order they happen. Complete may come
// before or after FirstResponse; Exited and Stopped end it.
const (
	StepMetadata      Step = "metadata"       // the overlay's metadata arrived and it is mounted
	StepLocal         Step = "local"          // the files of an extracted VM are used instead
	StepRunning       Step = "running"        // QEMU resumed the VM
	StepFirstResponse Step = "first-response" // the probe succeeded
	StepComplete      Step = "complete"       // every segment of the overlay is present
	StepExited        Step = "exited"         // the VM exited on its own
	StepStopping      Step = "stopping"       // a stop was asked for
	StepStopped       Step = "stopped"        // the VM was stopped
)

// Event is one step of the timeline.
type Event struct {
	At   time.Duration // since Run started
	Step Step
	Text string
}

// Running is what a caller can see of a launch once its VM runs.
type Running struct {
	Session  *session.Session // nil for an extracted VM
	VM       *qemu.VM
	QEMUPid  int
	Forwards []qemu.Forward
}

// Run mounts, resumes and serves the VM until it exits, the probe settles
// it (ExitAfterProbe), or ctx ends; then it stops QEMU and, after it,
// unmounts. An error says how the VM ended when that was not asked for.
func Run(ctx context.Context, opt Options) (err error) {
	start := time.Now()
	var markMu sync.Mutex // the probe marks too
	mark := func(step Step, what string) {
		markMu.Lock()
		defer markMu.Unlock()
		at := time.Since(start)
		if opt.Timeline != nil {
			fmt.Fprintf(opt.Timeline, "%8.3f s  %s\n", at.Seconds(), what)
		}
		if opt.Events != nil {
			opt.Events(Event{At: at, Step: step, Text: what})
		}
	}
	// The VM's files: from a mount of the overlay, or, for the full
	// synthesis baseline, from a directory `overlay extract` wrote.
	var memory, disk, state, baseDir string
	var cfg *qemu.Config
	var s *session.Session
	if opt.Dir != "" {
		ref := opt.Dir
		memory, disk, state = filepath.Join(ref, overlay.MemoryFile), filepath.Join(ref, overlay.DiskFile), filepath.Join(ref, overlay.StateFile)
		raw, err := os.ReadFile(filepath.Join(ref, overlay.VMConfigFile))
		if err != nil {
			return fmt.Errorf("%s: not an extracted VM: %w", ref, err)
		}
		if cfg, err = qemu.LoadConfig(raw); err != nil {
			return err
		}
		mark(StepLocal, "local files of an extracted VM")
	} else {
		ref := opt.Session.Overlay
		mnt := opt.Mountpoint
		if mnt == "" {
			session.CleanDeadMounts(filepath.Join(os.TempDir(), "cloudletfs-launch-*"), opt.Session.Log)
			if mnt, err = os.MkdirTemp("", "cloudletfs-launch-"); err != nil {
				return err
			}
			defer os.Remove(mnt)
		}
		// The VM must be able to run before earlier writes are discarded.
		check := func(o *overlay.Overlay, base *store.Base) error {
			if o.VMConfig == nil {
				return fmt.Errorf("overlay %s carries no vm.json: build it with `overlay capture`, or pass --vm-config to `overlay create`", fetch.Redact(ref))
			}
			var err error
			if cfg, err = qemu.LoadConfig(o.VMConfig); err != nil {
				return err
			}
			baseCfg, dir, err := BaseConfig(base)
			if err != nil {
				return err
			}
			if a, b := mustJSON(cfg), mustJSON(baseCfg); a != b {
				return fmt.Errorf("the overlay's vm.json does not match base %s's QEMU configuration:\n overlay: %s\n base:    %s", base.Name, a, b)
			}
			baseDir = dir
			return nil
		}
		sopt := opt.Session
		sopt.Mountpoint, sopt.Fresh, sopt.Check = mnt, true, check
		if s, err = session.Open(ctx, sopt); err != nil {
			return err
		}
		defer s.Close()
		mark(StepMetadata, fmt.Sprintf("metadata arrived, mounted (%s overlay, %d segments)", humanize.IBytes(uint64(s.Overlay.Header.TotalLen())), len(s.Overlay.Manifest.Segments)))
		memory, disk, state = filepath.Join(mnt, "memory", "image"), filepath.Join(mnt, "disk", "image"), filepath.Join(mnt, "state")
	}
	cfg.Extra = append(cfg.Extra, opt.Extra...)
	fwd, err := forwards(cfg, opt.Forwards)
	if err != nil {
		return err
	}
	port, probeHost := 0, ""
	if len(fwd) > 0 {
		port, probeHost = fwd[0].HostPort, reach(fwd[0].HostAddr)
	} else if opt.ProbeHTTP != "" {
		return errors.New("the HTTP probe needs a port forwarded to the guest, and the VM's vm.json names none: ask for one")
	}
	// A directory of its own: launches in one process never share a socket.
	qmpDir, err := os.MkdirTemp("", "cloudletfs-qmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(qmpDir)
	qmp := filepath.Join(qmpDir, "qmp.sock")
	args := cfg.Args(qemu.Run{Accel: opt.Accel, Memory: memory, Share: false,
		Disk: disk, QMP: qmp, Incoming: true, Forwards: fwd, Dir: baseDir})
	vm, err := qemu.Start(ctx, opt.QEMU, args, qmp, opt.Console)
	if err != nil {
		return err
	}
	// QEMU first: the mount is unmounted once nothing holds it.
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		vm.Quit(context.Background())
		if opt.Stopped != nil && s != nil {
			return opt.Stopped(s)
		}
		return nil
	}
	defer func() {
		if serr := stop(); err == nil {
			err = serr
		}
	}()
	if err := vm.Resume(ctx, state); err != nil {
		// QEMU reads guest memory while it resumes; if a read fails it
		// dies, and the QMP error alone would not say why.
		if ctx.Err() != nil {
			return err
		}
		select {
		case <-vm.Exited():
			return fmt.Errorf("resuming the VM: %w", vmEnded(vm, s, false))
		case <-time.After(2 * time.Second):
			return err
		}
	}
	// Running first: whoever reports the step has the ports by then.
	if opt.Running != nil {
		opt.Running(Running{QEMUPid: vm.Pid(), VM: vm, Forwards: fwd, Session: s})
	}
	mark(StepRunning, fmt.Sprintf("QEMU running (%s%s)", opt.Accel, describeForwards(fwd)))

	probed := make(chan error, 1)
	if opt.Probe != "" || opt.ProbeHTTP != "" {
		// The probe ends before Run does, and before the mount it marks
		// goes.
		pctx, cancel := context.WithCancel(ctx)
		ended := make(chan struct{})
		defer func() { cancel(); <-ended }()
		go func() {
			defer close(ended)
			probed <- probe(pctx, opt, s, probeHost, port, vm, mark)
		}()
	} else {
		close(probed)
	}
	var complete <-chan struct{} // nil, never ready, without a mount
	if s != nil {
		complete = s.Fetcher.Complete()
	}
	probeDone := opt.Probe == "" && opt.ProbeHTTP == ""
	for {
		select {
		case err, more := <-probed:
			if !more {
				probed = nil
				continue
			}
			if errors.Is(err, errVMExited) {
				probed = nil // the VM's exit is reported below
				continue
			}
			if err != nil {
				return err
			}
			probeDone, probed = true, nil
		case <-complete:
			st := s.Fetcher.Stats()
			mark(StepComplete, fmt.Sprintf("overlay complete (%s fetched, %d demand fetches, stalled %.0f ms: some read waited; %.0f ms waited summed over reads)", humanize.IBytes(uint64(st.BytesFetched)), st.DemandFetches, st.StallMs, st.WaitTotalMs))
			complete = nil
		case <-vm.Exited():
			mark(StepExited, "the VM exited")
			if err := stop(); err != nil {
				return err
			}
			return vmEnded(vm, s, probeDone)
		case <-ctx.Done():
			mark(StepStopping, "stopping on a signal")
			err := stop()
			if opt.Events != nil {
				opt.Events(Event{At: time.Since(start), Step: StepStopped, Text: "stopped the VM"})
			}
			return err
		}
		if opt.ExitAfterProbe && probeDone && (s == nil || complete == nil || opt.Session.Policy == order.DemandOnly) {
			err := stop()
			mark(StepStopped, "stopped the VM")
			return err
		}
	}
}

// forwards resolves the ports to forward: free host ports where none is
// given, and vm.json's guest port when none is asked for.
func forwards(cfg *qemu.Config, want []qemu.Forward) ([]qemu.Forward, error) {
	if len(want) == 0 {
		want = []qemu.Forward{{}}
	}
	var out []qemu.Forward
	for _, f := range want {
		if f.GuestPort == 0 {
			if cfg.GuestPort == 0 || cfg.NIC == "" {
				continue // vm.json forwards nothing
			}
			f.GuestPort = cfg.GuestPort
		}
		if cfg.NIC == "" {
			return nil, errors.New("the VM has no network card (vm.json names no nic), so no port can be forwarded to it")
		}
		if f.GuestPort < 1 || f.GuestPort > 65535 {
			return nil, fmt.Errorf("guest port %d: want 1 to 65535", f.GuestPort)
		}
		if f.HostAddr == "" {
			f.HostAddr = "127.0.0.1"
		}
		if f.HostPort == 0 {
			p, err := FreePortOn(f.HostAddr)
			if err != nil {
				return nil, err
			}
			f.HostPort = p
		}
		out = append(out, f)
	}
	return out, nil
}

func describeForwards(fwd []qemu.Forward) string {
	var b strings.Builder
	for _, f := range fwd {
		fmt.Fprintf(&b, "; guest port %d on %s", f.GuestPort, net.JoinHostPort(f.HostAddr, strconv.Itoa(f.HostPort)))
	}
	return b.String()
}

// vmEnded is the outcome of a launch whose VM exited on its own: an error
// if QEMU failed, or if it ended before the probe succeeded. Reads the
// mount failed are named, since QEMU dies of SIGBUS when a page of guest
// memory cannot be read.
func vmEnded(vm *qemu.VM, s *session.Session, probeDone bool) error {
	err := vm.ExitErr()
	if err == nil && probeDone {
		return nil
	}
	what := "QEMU exited before the probe succeeded"
	if err != nil {
		what = fmt.Sprintf("QEMU exited: %v", err)
	}
	if s != nil {
		if st := s.Fetcher.Stats(); st.FailedFetches+st.Timeouts > 0 {
			what += fmt.Sprintf("; the mount answered reads with EIO: %d timed out waiting for their segment, %d segment fetches failed (%d fetch errors)", st.Timeouts, st.FailedFetches, st.FetchErrors)
		}
	}
	return fmt.Errorf("%s; last console lines:\n%s", what, vm.Tail(10))
}

// errVMExited ends a probe whose VM has exited.
var errVMExited = errors.New("the VM exited")

// probe runs the probe command until it succeeds, and marks the first
// response on the timeline.
func probe(ctx context.Context, opt Options, s *session.Session, host string, port int, vm *qemu.VM, mark func(Step, string)) error {
	deadline := time.Now().Add(opt.ProbeTimeout)
	try := func() (string, error) { return probeShell(ctx, opt.Probe, port) }
	if opt.Probe == "" {
		try = func() (string, error) { return probeHTTP(ctx, opt.ProbeHTTP, host, port) }
	}
	for {
		out, err := try()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil {
			mark(StepFirstResponse, "first response: "+strings.TrimSpace(out))
			if s != nil {
				s.Mount.Mark(order.FirstResponse)
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("--probe never succeeded within %s (last: %v); last console lines:\n%s", opt.ProbeTimeout, err, vm.Tail(10))
		}
		select {
		case <-vm.Exited():
			return errVMExited
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// probeShell runs a probe command once, with the host port in
// $CLOUDLETFS_PORT.
func probeShell(ctx context.Context, command string, port int) (string, error) {
	cmd := exec.CommandContext(ctx, "sh", "-c", command)
	cmd.Env = append(os.Environ(), "CLOUDLETFS_PORT="+strconv.Itoa(port))
	// A stop ends the probe's whole process group, not only sh: a child
	// left holding its output would keep Output, and so the stop, waiting.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	qemu.CloseOnExec()
	out, err := cmd.Output()
	return string(out), err
}

// probeHTTP GETs path on the forwarded port once; a 2xx reply is a
// response, and its first line is what the timeline shows.
func probeHTTP(ctx context.Context, path, host string, port int) (string, error) {
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode/100 != 2 {
		return "", fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	if err != nil {
		// A reply cut short is not yet the application answering.
		return "", fmt.Errorf("GET %s: %s, then the body was cut: %w", path, resp.Status, err)
	}
	first, _, _ := strings.Cut(string(body), "\n")
	return fmt.Sprintf("HTTP %d %s", resp.StatusCode, strings.TrimSpace(first)), nil
}

// reach is the address that reaches a port bound to addr from this host:
// addr itself, or the loopback address of its family when addr is all of
// them.
func reach(addr string) string {
	ip := net.ParseIP(addr)
	switch {
	case ip == nil || !ip.IsUnspecified():
		return addr
	case ip.To4() != nil:
		return "127.0.0.1"
	}
	return "::1"
}

// probeClient keeps no connection: each try must reach the guest anew.
var probeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// BaseConfig loads a base's vm.json, and returns the directory its kernel
// and initrd are in.
func BaseConfig(b *store.Base) (*qemu.Config, string, error) {
	if b.VMConfig == nil {
		return nil, "", fmt.Errorf("base %s has no vm.json: it was imported, not created with `base create`, so cloudletfs cannot run it", b.Name)
	}
	raw, err := os.ReadFile(b.VMConfig.Path)
	if err != nil {
		return nil, "", err
	}
	cfg, err := qemu.LoadConfig(raw)
	return cfg, filepath.Dir(b.VMConfig.Path), err
}

// FreePort asks the kernel for a free TCP port on 127.0.0.1.
func FreePort() (int, error) { return FreePortOn("127.0.0.1") }

// FreePortOn asks the kernel for a free TCP port on the address host.
func FreePortOn(host string) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
