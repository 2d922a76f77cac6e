package capture

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

// Options say what base to customize and how.
type Options struct {
	StateDir    string
	Base        string // by ID or name
	QEMU, Accel string // checked and resolved
	// Script is typed into the serial console, after which Ready waits.
	// Without one, Interactive is copied to the console until it ends.
	Script      []byte
	Ready       ReadyFunc
	Interactive io.Reader
	// NoDiscard captures what the guest deleted and freed: no trim, no
	// wait, and the mount refuses discards. DiscardSettle and
	// DiscardTimeout bound the wait for discards to settle otherwise.
	NoDiscard                     bool
	DiscardSettle, DiscardTimeout time.Duration
	Codec                         overlay.Codec
	Jobs                          int
	Output                        string // the overlay to write
	// TraceOut, if set, gets the accesses seen while the VM ran before
	// the overlay is built.
	TraceOut func(*order.Trace) error
	// Out gets the lines that say what the capture does; Notes the lines
	// that ask the user for something, or say where to look after a
	// failure.
	Out, Notes io.Writer
	Console    io.Writer // a copy of the guest's console, or nil
	Log        zerolog.Logger
}

// Result is what a capture built.
type Result struct {
	Summary *overlay.Summary
	Took    time.Duration // building the overlay
	Touched int           // chunks the VM touched while it ran, which stream first
}

// Capture runs the base from a mount of an overlay that changes nothing:
// reads come from the base and are recorded, writes land copy-on-write in
// the store, and the base's files are never touched. Once customized, the
// VM is saved and the overlay of its disk, memory and state is built, with
// the chunks it touched first in the stream.
func Capture(ctx context.Context, opt Options) (_ *Result, err error) {
	st, err := store.Open(opt.StateDir, opt.Log)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	rec, err := st.Resolve(opt.Base)
	if err != nil {
		return nil, err
	}
	if err := rec.CheckFiles(); err != nil {
		return nil, err
	}
	if _, _, err := launch.BaseConfig(rec); err != nil {
		return nil, err
	}
	work, unlock, err := captureDir(st.Dir(), opt.Log)
	if err != nil {
		return nil, err
	}
	defer unlock()
	defer os.RemoveAll(work)

	base, closeBase, err := st.Open(rec)
	if err != nil {
		return nil, err
	}
	defer closeBase()
	ident := filepath.Join(work, "base.overlay")
	in, closeInput, err := overlay.OpenInput(rec.Disk.Path, rec.Memory.Path, rec.State.Path, rec.VMConfig.Path)
	if err != nil {
		return nil, err
	}
	_, err = overlay.Build(ident, base, in, overlay.BuildOptions{Codec: overlay.CodecZstd, Workers: opt.Jobs})
	closeInput()
	if err != nil {
		return nil, err
	}
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		return nil, err
	}
	// The mount takes the registry itself.
	if err := st.Close(); err != nil {
		return nil, err
	}
	// Start from the base as it is, whatever an earlier capture wrote.
	s, err := session.Open(ctx, session.Options{Overlay: ident, Mountpoint: mnt, StateDir: opt.StateDir,
		Log: opt.Log, FetchTimeout: time.Minute, Fresh: true, DropWritten: true, NoDiscard: opt.NoDiscard})
	if err != nil {
		return nil, err
	}
	// Unmounted after QEMU has quit (deferred later, run earlier).
	defer s.Close()
	cfg, err := qemu.LoadConfig(s.Overlay.VMConfig)
	if err != nil {
		return nil, err
	}
	consoleLog, err := os.CreateTemp("", "cloudletfs-capture-*.console.log")
	if err != nil {
		return nil, err
	}
	// Kept to read when the capture fails; nothing to read once it worked.
	defer func() {
		consoleLog.Close()
		if err == nil {
			os.Remove(consoleLog.Name())
		} else {
			fmt.Fprintf(opt.Notes, "the guest's console is kept in %s\n", consoleLog.Name())
		}
	}()
	console := io.Writer(consoleLog)
	if opt.Console != nil {
		console = io.MultiWriter(opt.Console, consoleLog)
	}

	memPath, diskPath := filepath.Join(mnt, "memory", "image"), filepath.Join(mnt, "disk", "image")
	qmp := filepath.Join(work, "qmp.sock")
	args := cfg.Args(qemu.Run{Accel: opt.Accel, Memory: memPath, Share: true, Disk: diskPath, QMP: qmp, Incoming: true, NoDiscard: opt.NoDiscard})
	vm, err := qemu.Start(ctx, opt.QEMU, args, qmp, console)
	if err != nil {
		return nil, err
	}
	defer vm.Quit(context.Background())
	if err := vm.Resume(ctx, rec.State.Path); err != nil {
		return nil, err
	}
	fmt.Fprintf(opt.Out, "the VM is running (%s); its console goes to %s\n", opt.Accel, consoleLog.Name())
	if opt.Script != nil {
		vm.ClearConsole()
		for _, line := range strings.SplitAfter(string(opt.Script), "\n") {
			if err := vm.Type(line); err != nil {
				return nil, err
			}
		}
		stop := showProgress(opt.Out, s, 5*time.Second)
		err := opt.Ready(ctx, vm)
		stop()
		if err != nil {
			return nil, err
		}
	} else {
		fmt.Fprintln(opt.Notes, "the VM's console is attached; customize it, then press Ctrl-D to capture")
		typed := make(chan error, 1)
		go func() {
			_, err := io.Copy(vmWriter{vm}, opt.Interactive)
			typed <- err
		}()
		select {
		case err := <-typed:
			if err != nil {
				return nil, err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err := closeGap(ctx, opt, vm, s, cfg); err != nil {
		return nil, err
	}
	state := filepath.Join(work, "state")
	if err := vm.Save(ctx, state); err != nil {
		return nil, err
	}
	vm.Quit(ctx)
	// The guest's RAM was a shared mapping of memory/image: push its dirty
	// pages through the mount before reading the image back.
	for _, p := range []string{memPath, diskPath} {
		if err := syncFile(p); err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
	}

	trace := s.Mount.Trace()
	if opt.TraceOut != nil {
		if err := opt.TraceOut(trace); err != nil {
			return nil, err
		}
	}
	custom := &overlay.Input{
		Images: [2]io.ReaderAt{mountReader{ctx, s, overlay.Disk}, mountReader{ctx, s, overlay.Memory}},
		Sizes:  [2]int64{s.Overlay.Header.ImageSize(overlay.Disk), s.Overlay.Header.ImageSize(overlay.Memory)},
	}
	if custom.State, err = os.ReadFile(state); err != nil {
		return nil, err
	}
	custom.VMConfig = s.Overlay.VMConfig
	start := time.Now()
	sum, err := overlay.Build(opt.Output, base, custom, overlay.BuildOptions{Codec: opt.Codec, Workers: opt.Jobs, Order: order.FirstAccess(trace.Accesses)})
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", opt.Output, err)
	}
	return &Result{Summary: sum, Took: time.Since(start), Touched: len(trace.Accesses)}, nil
}

type vmWriter struct{ vm *qemu.VM }

func (w vmWriter) Write(p []byte) (int, error) { return len(p), w.vm.Type(string(p)) }

// closeGap has the guest trim its file systems and waits until the
// discards that follow, of disk blocks and of freed pages, have settled,
// so that what the guest deleted or freed is not saved. It says what it
// waited for and how many chunks were discarded.
func closeGap(ctx context.Context, opt Options, vm *qemu.VM, s *session.Session, cfg *qemu.Config) error {
	w := opt.Out
	discarded := func() int { return s.Mount.Stats().ChunksDiscarded }
	cs := uint64(s.Overlay.Header.ChunkSize)
	switch {
	case opt.NoDiscard:
		fmt.Fprintln(w, "--no-discard: no trim, and the mount refused discards; what the guest deleted or freed is captured")
		return nil
	case !cfg.Discard && !cfg.Balloon:
		fmt.Fprintln(w, "the base's vm.json records neither discard nor the balloon (an older base, or --no-discard): no trim; what the guest deleted or freed is captured")
		return nil
	}
	start := time.Now()
	limit := opt.DiscardTimeout
	before := discarded()
	if cfg.Discard {
		fmt.Fprintln(w, "trimming the guest's file systems")
		if err := vm.Trim(ctx, limit); err != nil {
			return fmt.Errorf("capture: %w; or capture with --no-discard", err)
		}
		fmt.Fprintf(w, "trimmed in %.1f s (%d chunks discarded so far)\n", time.Since(start).Seconds(), discarded())
	}
	quiet := opt.DiscardSettle
	slack := int((256 << 10) / cs)
	settled, err := qemu.Settle(ctx, discarded, quiet, slack, max(limit-time.Since(start), 0), 200*time.Millisecond)
	if err != nil {
		return err
	}
	if cfg.Discard {
		if err := vm.RestoreReporting(ctx, time.Minute); err != nil {
			return fmt.Errorf("capture: %w", err)
		}
	}
	n := discarded()
	what := fmt.Sprintf("less than 256 KiB discarded in %s", quiet)
	if !settled.Quiet {
		what = fmt.Sprintf("still discarding when --discard-timeout %s ran out; saving anyway", limit)
	}
	fmt.Fprintf(w, "waited %.1f s for the guest's discards to settle (%s): %d chunks (%s) discarded while the VM ran, %d of them since the trim began\n",
		settled.Waited.Seconds(), what, n, humanize.IBytes(uint64(n)*cs), n-before)
	return nil
}

// showProgress prints, every interval until stopped, how long the VM has
// been customized and how many chunks it has written.
func showProgress(w io.Writer, s *session.Session, interval time.Duration) (stop func()) {
	start := time.Now()
	done := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				st := s.Fetcher.Stats()
				fmt.Fprintf(w, "%8s  waiting for --ready: %d chunks written (disk %d, memory %d)\n",
					time.Since(start).Round(time.Second), st.Disk.Modified+st.Memory.Modified, st.Disk.Modified, st.Memory.Modified)
			}
		}
	}()
	return func() { close(done); <-ended }
}

// captureDir makes a capture's work directory in the state dir, locked
// for as long as the capture runs, and first removes those that captures
// killed before they could clean up left behind. One lock on the state dir
// orders the two, so a directory is never taken for stale between its
// creation and its lock.
func captureDir(dir string, log zerolog.Logger) (work string, unlock func(), err error) {
	all, err := flock(filepath.Join(dir, "capture.lock"), true)
	if err != nil {
		return "", nil, err
	}
	defer all.Close()
	stale, _ := filepath.Glob(filepath.Join(dir, "capture-*"))
	for _, w := range stale {
		cleanStaleCapture(w, log)
	}
	if work, err = os.MkdirTemp(dir, "capture-*"); err != nil {
		return "", nil, err
	}
	lock, err := flock(filepath.Join(work, "lock"), true)
	if err != nil {
		os.RemoveAll(work)
		return "", nil, err
	}
	return work, func() { lock.Close() }, nil
}

// flock opens path, creating it, and locks it exclusively, waiting or not.
func flock(path string, wait bool) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	how := syscall.LOCK_EX
	if !wait {
		how |= syscall.LOCK_NB
	}
	if err := syscall.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return f, nil
}

// cleanStaleCapture removes the work directory of a capture that no longer
// runs: one whose lock is free. The mount inside, whose daemon is gone, is
// detached first, so the removal never reaches into a mount.
func cleanStaleCapture(work string, log zerolog.Logger) {
	lock, err := flock(filepath.Join(work, "lock"), false)
	if err != nil {
		return // a capture running now
	}
	defer lock.Close()
	mnt := filepath.Join(work, "mnt")
	if fstype, err := session.MountType(mnt); err != nil {
		return
	} else if fstype != "" {
		if fstype != session.FSType || !session.IsDead(mnt) || session.CleanDead(mnt) != nil {
			log.Warn().Str("dir", work).Msg("a killed capture left a mount behind that cannot be cleaned: unmount it, then remove the directory")
			return
		}
	}
	if err := os.RemoveAll(work); err != nil {
		log.Warn().Err(err).Str("dir", work).Msg("could not remove what a killed capture left behind")
		return
	}
	log.Info().Str("dir", work).Msg("removed what a killed capture left behind")
}

// mountReader reads one image of a mounted overlay in-process, until ctx
// ends.
type mountReader struct {
	ctx context.Context
	s   *session.Session
	img overlay.Image
}

func (r mountReader) ReadAt(p []byte, off int64) (int, error) {
	size := r.s.Overlay.Header.ImageSize(r.img)
	if off >= size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), size-off)
	if err := r.s.Fetcher.ReadAt(r.ctx, r.img, p[:n], off); err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// syncFile fsyncs a file.
func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
