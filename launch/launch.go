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
}

// Run mounts, resumes and serves the VM until it exits, the probe settles
// it (ExitAfterProbe), or ctx ends; then it stops QEMU and, after it,
// unmounts. An error says how the VM ended when that was not asked for.
func Run(ctx context.Context, opt Options) (err error) {
	start := time.Now()
	var markMu sync.Mutex // the probe marks too
	mark := func(what string) {
		markMu.Lock()
		defer markMu.Unlock()
		fmt.Fprintf(opt.Timeline, "%8.3f s  %s\n", time.Since(start).Seconds(), what)
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
		mark("local files of an extracted VM")
	} else {
		ref := opt.Session.Overlay
		session.CleanDeadMounts(filepath.Join(os.TempDir(), "cloudletfs-launch-*"), opt.Session.Log)
		mnt, err := os.MkdirTemp("", "cloudletfs-launch-")
		if err != nil {
			return err
		}
		defer os.Remove(mnt)
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
		mark(fmt.Sprintf("metadata arrived, mounted (%s overlay, %d segments)", humanize.IBytes(uint64(s.Overlay.Header.TotalLen())), len(s.Overlay.Manifest.Segments)))
		memory, disk, state = filepath.Join(mnt, "memory", "image"), filepath.Join(mnt, "disk", "image"), filepath.Join(mnt, "state")
	}
	cfg.Extra = append(cfg.Extra, opt.Extra...)
	port, err := FreePort()
	if err != nil {
		return err
	}
	// A directory of its own: launches in one process never share a socket.
	qmpDir, err := os.MkdirTemp("", "cloudletfs-qmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(qmpDir)
	qmp := filepath.Join(qmpDir, "qmp.sock")
	args := cfg.Args(qemu.Run{Accel: opt.Accel, Memory: memory, Share: false,
		Disk: disk, QMP: qmp, Incoming: true, HostPort: port, Dir: baseDir})
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
	mark(fmt.Sprintf("QEMU running (%s; guest port %d on 127.0.0.1:%d)", opt.Accel, cfg.GuestPort, port))

	probed := make(chan error, 1)
	if opt.Probe != "" {
		// The probe ends before Run does, and before the mount it marks
		// goes.
		pctx, cancel := context.WithCancel(ctx)
		ended := make(chan struct{})
		defer func() { cancel(); <-ended }()
		go func() {
			defer close(ended)
			probed <- probe(pctx, opt, s, port, vm, mark)
		}()
	} else {
		close(probed)
	}
	var complete <-chan struct{} // nil, never ready, without a mount
	if s != nil {
		complete = s.Fetcher.Complete()
	}
	probeDone := opt.Probe == ""
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
			mark(fmt.Sprintf("overlay complete (%s fetched, %d demand fetches, stalled %.0f ms: some read waited; %.0f ms waited summed over reads)", humanize.IBytes(uint64(st.BytesFetched)), st.DemandFetches, st.StallMs, st.WaitTotalMs))
			complete = nil
		case <-vm.Exited():
			mark("the VM exited")
			if err := stop(); err != nil {
				return err
			}
			return vmEnded(vm, s, probeDone)
		case <-ctx.Done():
			mark("stopping on a signal")
			return stop()
		}
		if opt.ExitAfterProbe && probeDone && (s == nil || complete == nil || opt.Session.Policy == order.DemandOnly) {
			err := stop()
			mark("stopped the VM")
			return err
		}
	}
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
func probe(ctx context.Context, opt Options, s *session.Session, port int, vm *qemu.VM, mark func(string)) error {
	deadline := time.Now().Add(opt.ProbeTimeout)
	for {
		cmd := exec.CommandContext(ctx, "sh", "-c", opt.Probe)
		cmd.Env = append(os.Environ(), "CLOUDLETFS_PORT="+strconv.Itoa(port))
		// A stop ends the probe's whole process group, not only sh: a
		// child left holding its output would keep Output, and so the
		// stop, waiting.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = time.Second
		qemu.CloseOnExec()
		out, err := cmd.Output()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil {
			mark("first response: " + strings.TrimSpace(string(out)))
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
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
