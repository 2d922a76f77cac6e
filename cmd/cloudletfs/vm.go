package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

var (
	accelFlag = &cli.StringFlag{Name: "accel", Value: "auto", Usage: "auto (KVM when /dev/kvm works, else TCG), kvm or tcg"}
	qemuFlag  = &cli.StringFlag{Name: "qemu", Value: "qemu-system-x86_64", Usage: "QEMU binary"}
)

func vmCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "launch",
			Usage:     "mount an overlay and resume its VM in stock QEMU straight from the mount",
			UsageText: "cloudletfs launch [--base ID|NAME] [--accel auto|kvm|tcg] [--trace-out FILE] [--probe COMMAND] OVERLAY|DIR [-- EXTRA QEMU ARGS]",
			Description: `Mounts OVERLAY, starts QEMU on the mounted disk/image, memory/image (private
mapping) and state, with the virtual hardware its vm.json records, and resumes the
VM as soon as the metadata has arrived. Where vm.json records discard and the
balloon, what the guest trims and the pages it frees are punched out of the images:
through the mount that zeroes chunks copy-on-write, never the overlay or the base.
Prints a timeline: metadata arrived, QEMU running, first response (--probe
succeeded; it is run again until it does, with CLOUDLETFS_PORT set to the host port
forwarded to the guest), overlay complete. Runs until the VM exits or Ctrl-C, then stops QEMU and unmounts.
Given a DIR written by 'overlay extract' instead, it resumes from those local files:
the full-synthesis baseline. QEMU writes to its disk.img and punches the pages the
guest frees out of its memory.img, so extract again before each launch of a DIR.`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "base", Usage: "base VM, by ID or NAME (default: the overlay's own base ID)"},
				accelFlag, qemuFlag,
				&cli.PathFlag{Name: "trace-out", Usage: "write the accesses seen, timed from ready, to FILE"},
				&cli.StringFlag{Name: "probe", Usage: "shell command that succeeds once the guest answers"},
				&cli.DurationFlag{Name: "probe-timeout", Value: 5 * time.Minute, Usage: "give up on the probe after this long"},
				&cli.DurationFlag{Name: "fetch-timeout", Value: 30 * time.Second, Usage: "longest a read waits for its segment before failing with EIO"},
				&cli.BoolFlag{Name: "exit-after-probe", Usage: "stop the VM once the probe succeeded and the overlay is complete"},
				policyFlag, headerFlag, caCertFlag, cacheSizeFlag,
				&cli.BoolFlag{Name: "allow-other", Hidden: true},
				&cli.BoolFlag{Name: "debug-fuse", Hidden: true},
			},
			Action: launchCmd,
		},
	}
}

func baseCreateCommand() *cli.Command {
	return &cli.Command{
		Name:      "create",
		Usage:     "boot a VM with its RAM in a file, capture it when ready, and register it as a base",
		UsageText: "cloudletfs base create --name NAME --disk FILE --memory-size SIZE [--kernel K --initrd I --append A] [--ready REGEX | --ready-after DURATION] [-- EXTRA QEMU ARGS]",
		Description: `Copies FILE (which is never modified) into the state dir, boots it, and waits until
the serial console matches --ready (or for --ready-after, or for Enter on a terminal).
Then it saves the VM: RAM, device state and vm.json, with the kernel and initrd, and
imports the result as a base. The base ID is the last line printed.

vm.json records discard and the balloon, unless --no-discard: the drive passes the
guest's TRIM on (discard=unmap, detect-zeroes=unmap) and a virtio balloon with free
page reporting hands the pages the guest frees back to QEMU, which punches them out
of the memory file. Captures of the base then keep neither deleted files nor freed
memory. The guest needs the virtio_balloon driver for the latter; the device stays
part of the base's hardware, for every capture and launch of it.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "name", Required: true, Usage: "name to register the base under"},
			&cli.PathFlag{Name: "disk", Required: true, Usage: "raw disk image to boot (copied, never modified)"},
			&cli.StringFlag{Name: "memory-size", Required: true, Usage: "guest RAM, e.g. 256MiB"},
			&cli.PathFlag{Name: "kernel", Usage: "kernel to boot"},
			&cli.PathFlag{Name: "initrd", Usage: "initrd to boot with the kernel"},
			&cli.StringFlag{Name: "append", Value: "console=ttyS0", Usage: "kernel command line"},
			&cli.StringFlag{Name: "ready", Usage: "capture once a console line matches this regular expression"},
			&cli.DurationFlag{Name: "ready-after", Usage: "capture this long after start"},
			&cli.DurationFlag{Name: "ready-timeout", Value: 5 * time.Minute, Usage: "give up waiting for --ready after this long"},
			&cli.StringFlag{Name: "machine", Value: "pc", Usage: "QEMU machine type"},
			&cli.StringFlag{Name: "cpu", Value: "qemu64", Usage: "QEMU CPU model"},
			&cli.IntFlag{Name: "smp", Value: 1, Usage: "virtual CPUs"},
			&cli.StringFlag{Name: "disk-interface", Value: "virtio", Usage: "QEMU -drive if= value"},
			&cli.StringFlag{Name: "nic", Value: "e1000", Usage: "network card on user-mode networking (empty: none)"},
			&cli.IntFlag{Name: "guest-port", Value: 8080, Usage: "guest TCP port forwarded from the host on launch (0: none)"},
			&cli.BoolFlag{Name: "no-discard", Usage: "record neither discard nor the balloon in vm.json: for a guest without discard or virtio_balloon support"},
			accelFlag, qemuFlag,
		},
		Action: baseCreateCmd,
	}
}

func overlayCaptureCommand() *cli.Command {
	return &cli.Command{
		Name:      "capture",
		Usage:     "resume a base VM, customize it, and write the overlay of the result",
		UsageText: "cloudletfs overlay capture --base ID|NAME [--script FILE] [--ready REGEX] [--no-discard] [--trace-out FILE] -o OUT",
		Description: `Resumes the base copy-on-write (the base's files are not touched). Without --script
the serial console is attached to the terminal; end with Ctrl-D. With --script, its
lines are typed into the console and the capture waits for --ready. Then it saves the
VM and writes the overlay with the engine of 'overlay create'. The chunks the VM
touched while it ran stream first, in order of first access.

Where the base's vm.json records discard and the balloon ('base create' does so by
default), the capture closes the semantic gap before it saves: it types a command
into the console that syncs, runs fstrim on every ext2/3/4, xfs and btrfs mount and
has the guest report every free page, not only free 2 MiB blocks; so a shell must
wait at the prompt once the customization is done (start services in the
background). Then it waits until less than 256 KiB has been discarded in
--discard-settle (freed pages are reported 2 s after they are freed), at most
--discard-timeout, puts the guest's reporting back as it was, and says how many
chunks were discarded. What the guest deleted or freed then becomes zero chunks,
which the overlay does not carry.

--no-discard captures as if none of that existed, for comparison: no trim and no
wait, the drive ignores discards and the mount refuses QEMU's punches of freed
pages, as before the mount took them. The guest's virtual hardware stays the base's
(a saved state resumes only on the hardware it was saved on) and so does the
overlay's vm.json, so a launch of the overlay has discard and the balloon again.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "base", Required: true, Usage: "base VM, by ID or NAME"},
			&cli.PathFlag{Name: "script", Usage: "lines to type into the serial console"},
			&cli.StringFlag{Name: "ready", Usage: "capture once a console line matches this regular expression"},
			&cli.DurationFlag{Name: "ready-timeout", Value: 5 * time.Minute, Usage: "give up waiting for --ready after this long"},
			&cli.PathFlag{Name: "trace-out", Usage: "write the accesses seen while the VM ran, the overlay's stream order, to FILE"},
			&cli.PathFlag{Name: "output", Aliases: []string{"o"}, Required: true, Usage: "overlay file to write"},
			&cli.StringFlag{Name: "codec", Value: "xz", Usage: "segment codec: xz or zstd"},
			&cli.BoolFlag{Name: "no-discard", Usage: "keep what the guest deleted and freed: no trim, no wait, discards refused"},
			&cli.DurationFlag{Name: "discard-settle", Value: 5 * time.Second, Usage: "save once less than 256 KiB was discarded in this long (more than the guest's 2 s reporting delay)"},
			&cli.DurationFlag{Name: "discard-timeout", Value: 5 * time.Minute, Usage: "longest the trim and the wait for discards to settle take together"},
			accelFlag, qemuFlag, jobsFlag,
		},
		Action: overlayCaptureCmd,
	}
}

// copyFile copies src to dst (a reflink where the file system can).
func copyFile(src, dst string) error {
	out, err := exec.Command("cp", "--reflink=auto", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copy %s: %v: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func readyWait(c *cli.Context, vm *qemu.VM) error {
	ctx := c.Context
	switch {
	case c.String("ready") != "":
		re, err := regexp.Compile(c.String("ready"))
		if err != nil {
			return badFlag("--ready: %v", err)
		}
		return vm.WaitConsole(ctx, re, c.Duration("ready-timeout"))
	case c.Duration("ready-after") > 0:
		select {
		case <-time.After(c.Duration("ready-after")):
			return nil
		case <-vm.Exited():
			return fmt.Errorf("QEMU exited; last console lines:\n%s", vm.Tail(15))
		case <-ctx.Done():
			return ctx.Err()
		}
	case term.IsTerminal(int(os.Stdin.Fd())):
		fmt.Fprintln(c.App.ErrWriter, "press Enter to capture the VM")
		entered := make(chan struct{})
		go func() {
			bufio.NewReader(os.Stdin).ReadString('\n')
			close(entered)
		}()
		select {
		case <-entered:
			return nil
		case <-vm.Exited():
			return fmt.Errorf("QEMU exited; last console lines:\n%s", vm.Tail(15))
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return errors.New("say when the VM is ready: --ready REGEX or --ready-after DURATION")
}

func baseCreateCmd(c *cli.Context) error {
	bin, err := qemu.CheckBinary(c.String("qemu"))
	if err != nil {
		return err
	}
	accel, err := qemu.ResolveAccel(c.String("accel"))
	if err != nil {
		return err
	}
	memSize, err := humanize.ParseBytes(c.String("memory-size"))
	if err != nil || memSize < 16<<20 || memSize%(1<<20) != 0 {
		return badFlag("--memory-size %q: want whole MiB, at least 16MiB, e.g. 256MiB", c.String("memory-size"))
	}
	for _, f := range []string{"disk", "kernel", "initrd"} {
		if p := c.Path(f); p != "" {
			if _, err := os.Stat(p); err != nil {
				return fmt.Errorf("--%s: %w", f, err)
			}
		}
	}
	// The registry is not held while the guest boots, so mounts can start
	// meanwhile; Import checks the name again.
	st, err := openStore(c)
	if err != nil {
		return err
	}
	name := c.String("name")
	_, err = st.Resolve(name)
	st.Close()
	if err == nil {
		return fmt.Errorf("a base named %q is already registered", name)
	}
	dir, err := os.MkdirTemp(filepath.Join(st.Dir()), "base-"+name+"-*")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(dir)
		}
	}()
	cfg := &qemu.Config{Machine: c.String("machine"), CPU: c.String("cpu"), SMP: c.Int("smp"), MemoryMiB: int(memSize >> 20),
		DiskIf: c.String("disk-interface"), NIC: c.String("nic"), GuestPort: c.Int("guest-port"), Append: c.String("append"),
		Extra: extra(c), Discard: !c.Bool("no-discard"), Balloon: !c.Bool("no-discard")}
	if p := c.Path("kernel"); p != "" {
		cfg.Kernel = "vmlinuz"
		if err := copyFile(p, filepath.Join(dir, cfg.Kernel)); err != nil {
			return err
		}
	}
	if p := c.Path("initrd"); p != "" {
		cfg.Initrd = "initrd.img"
		if err := copyFile(p, filepath.Join(dir, cfg.Initrd)); err != nil {
			return err
		}
	}
	files := store.ImportFiles{Disk: filepath.Join(dir, "disk.img"), Memory: filepath.Join(dir, "memory.img"),
		State: filepath.Join(dir, "state"), VMConfig: filepath.Join(dir, "vm.json")}
	if err := copyFile(c.Path("disk"), files.Disk); err != nil {
		return err
	}
	cj, _ := json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(files.VMConfig, append(cj, '\n'), 0o644); err != nil {
		return err
	}
	args := cfg.Args(qemu.Run{Accel: accel, Memory: files.Memory, Share: true, Disk: files.Disk,
		QMP: filepath.Join(dir, "qmp.sock"), Dir: dir, Boot: true})
	log := logger(c)
	log.Info().Str("accel", accel).Msg("booting the base VM")
	vm, err := qemu.Start(c.Context, bin, args, filepath.Join(dir, "qmp.sock"), consoleOut(c))
	if err != nil {
		return err
	}
	defer vm.Quit(context.Background())
	if err := readyWait(c, vm); err != nil {
		return err
	}
	if err := vm.Save(c.Context, files.State); err != nil {
		return err
	}
	vm.Quit(c.Context)
	os.Remove(filepath.Join(dir, "qmp.sock"))
	if st, err = openStore(c); err != nil {
		return err
	}
	defer st.Close()
	b, err := st.Import(name, files, overlay.DefaultChunkSize, 0, nil)
	if err != nil {
		return err
	}
	ok = true
	fmt.Fprintf(c.App.Writer, "created base %q in %s: memory %s, disk %s, state %s\n", name, dir,
		humanize.IBytes(uint64(b.Memory.Size)), humanize.IBytes(uint64(b.Disk.Size)), humanize.IBytes(uint64(b.State.Size)))
	fmt.Fprintln(c.App.Writer, b.ID)
	return nil
}

// consoleOut is where the guest's console goes: the terminal when there is
// one, the debug log otherwise.
func consoleOut(c *cli.Context) io.Writer {
	if c.String("log-level") == "debug" || term.IsTerminal(int(os.Stdout.Fd())) {
		return c.App.ErrWriter
	}
	return nil
}

func overlayCaptureCmd(c *cli.Context) (err error) {
	bin, err := qemu.CheckBinary(c.String("qemu"))
	if err != nil {
		return err
	}
	accel, err := qemu.ResolveAccel(c.String("accel"))
	if err != nil {
		return err
	}
	codec, err := overlay.ParseCodec(c.String("codec"))
	if err != nil || codec == overlay.CodecNone {
		return badFlag("--codec %q: want xz or zstd", c.String("codec"))
	}
	noDiscard := c.Bool("no-discard")
	if c.Duration("discard-settle") <= 0 || c.Duration("discard-timeout") <= 0 {
		return badFlag("--discard-settle and --discard-timeout want positive durations, e.g. 5s and 5m")
	}
	var script []byte
	if p := c.Path("script"); p != "" {
		if script, err = os.ReadFile(p); err != nil {
			return fmt.Errorf("--script: %w", err)
		}
		if c.String("ready") == "" {
			return errors.New("--script needs --ready: the console line that says the customization is done")
		}
	}
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	rec, err := st.Resolve(c.String("base"))
	if err != nil {
		return err
	}
	if err := rec.CheckFiles(); err != nil {
		return err
	}
	if _, _, err := launch.BaseConfig(rec); err != nil {
		return err
	}
	work, unlock, err := captureDir(st.Dir(), logger(c))
	if err != nil {
		return err
	}
	defer unlock()
	defer os.RemoveAll(work)

	// Run the base from a mount of an overlay that changes nothing: reads
	// come from the base and are recorded, writes land copy-on-write in the
	// store, and the base's files are never touched.
	base, closeBase, err := st.Open(rec)
	if err != nil {
		return err
	}
	defer closeBase()
	ident := filepath.Join(work, "base.overlay")
	_, err = buildFromFiles(ident, base, rec.Disk.Path, rec.Memory.Path, rec.State.Path, rec.VMConfig.Path,
		overlay.BuildOptions{Codec: overlay.CodecZstd, Workers: c.Int("jobs")})
	if err != nil {
		return err
	}
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		return err
	}
	// The mount takes the registry itself.
	if err := st.Close(); err != nil {
		return err
	}
	// Start from the base as it is, whatever an earlier capture wrote.
	s, err := session.Open(c.Context, session.Options{Overlay: ident, Mountpoint: mnt, StateDir: c.String("state-dir"),
		Log: logger(c), FetchTimeout: time.Minute, Fresh: true, DropWritten: true, NoDiscard: noDiscard})
	if err != nil {
		return err
	}
	// Unmounted after QEMU has quit (deferred later, run earlier).
	defer s.Close()
	cfg, err := qemu.LoadConfig(s.Overlay.VMConfig)
	if err != nil {
		return err
	}
	consoleLog, err := os.CreateTemp("", "cloudletfs-capture-*.console.log")
	if err != nil {
		return err
	}
	// Kept to read when the capture fails; nothing to read once it worked.
	defer func() {
		consoleLog.Close()
		if err == nil {
			os.Remove(consoleLog.Name())
		} else {
			fmt.Fprintf(c.App.ErrWriter, "the guest's console is kept in %s\n", consoleLog.Name())
		}
	}()
	console := io.Writer(consoleLog)
	if out := consoleOut(c); out != nil {
		console = io.MultiWriter(out, consoleLog)
	}

	memPath, diskPath := filepath.Join(mnt, "memory", "image"), filepath.Join(mnt, "disk", "image")
	qmp := filepath.Join(work, "qmp.sock")
	args := cfg.Args(qemu.Run{Accel: accel, Memory: memPath, Share: true, Disk: diskPath, QMP: qmp, Incoming: true, NoDiscard: noDiscard})
	vm, err := qemu.Start(c.Context, bin, args, qmp, console)
	if err != nil {
		return err
	}
	defer vm.Quit(context.Background())
	if err := vm.Resume(c.Context, rec.State.Path); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "the VM is running (%s); its console goes to %s\n", accel, consoleLog.Name())
	if script != nil {
		vm.ClearConsole()
		for _, line := range strings.SplitAfter(string(script), "\n") {
			if err := vm.Type(line); err != nil {
				return err
			}
		}
		stop := showProgress(c.App.Writer, s, 5*time.Second)
		err := readyWait(c, vm)
		stop()
		if err != nil {
			return err
		}
	} else {
		fmt.Fprintln(c.App.ErrWriter, "the VM's console is attached; customize it, then press Ctrl-D to capture")
		typed := make(chan error, 1)
		go func() {
			_, err := io.Copy(vmWriter{vm}, os.Stdin)
			typed <- err
		}()
		select {
		case err := <-typed:
			if err != nil {
				return err
			}
		case <-c.Context.Done():
			return c.Context.Err()
		}
	}
	if err := closeGap(c, vm, s, cfg, noDiscard); err != nil {
		return err
	}
	state := filepath.Join(work, "state")
	if err := vm.Save(c.Context, state); err != nil {
		return err
	}
	vm.Quit(c.Context)
	// The guest's RAM was a shared mapping of memory/image: push its dirty
	// pages through the mount before reading the image back.
	for _, p := range []string{memPath, diskPath} {
		if err := syncFile(p); err != nil {
			return fmt.Errorf("capture: %w", err)
		}
	}

	trace := s.Mount.Trace()
	if p := c.Path("trace-out"); p != "" {
		if err := writeTrace(p, func(w io.Writer) error { return order.Write(w, trace) }); err != nil {
			return fmt.Errorf("--trace-out: %w", err)
		}
	}
	in := &overlay.Input{
		Images: [2]io.ReaderAt{mountReader{c.Context, s, overlay.Disk}, mountReader{c.Context, s, overlay.Memory}},
		Sizes:  [2]int64{s.Overlay.Header.ImageSize(overlay.Disk), s.Overlay.Header.ImageSize(overlay.Memory)},
	}
	if in.State, err = os.ReadFile(state); err != nil {
		return err
	}
	in.VMConfig = s.Overlay.VMConfig
	out := c.Path("output")
	start := time.Now()
	sum, err := overlay.Build(out, base, in, overlay.BuildOptions{Codec: codec, Workers: c.Int("jobs"), Order: order.FirstAccess(trace.Accesses)})
	if err != nil {
		return fmt.Errorf("overlay %s: %w", out, err)
	}
	printSummary(c.App.Writer, out, sum, codec, time.Since(start))
	fmt.Fprintf(c.App.Writer, "stream order: the %d chunks the VM touched while it ran come first\n", len(trace.Accesses))
	return nil
}

// closeGap has the guest trim its file systems and waits until the
// discards that follow, of disk blocks and of freed pages, have settled,
// so that what the guest deleted or freed is not saved. It says what it
// waited for and how many chunks were discarded.
func closeGap(c *cli.Context, vm *qemu.VM, s *session.Session, cfg *qemu.Config, noDiscard bool) error {
	w := c.App.Writer
	discarded := func() int { return s.Mount.Stats().ChunksDiscarded }
	cs := uint64(s.Overlay.Header.ChunkSize)
	switch {
	case noDiscard:
		fmt.Fprintln(w, "--no-discard: no trim, and the mount refused discards; what the guest deleted or freed is captured")
		return nil
	case !cfg.Discard && !cfg.Balloon:
		fmt.Fprintln(w, "the base's vm.json records neither discard nor the balloon (an older base, or --no-discard): no trim; what the guest deleted or freed is captured")
		return nil
	}
	start := time.Now()
	limit := c.Duration("discard-timeout")
	before := discarded()
	if cfg.Discard {
		fmt.Fprintln(w, "trimming the guest's file systems")
		if err := vm.Trim(c.Context, limit); err != nil {
			return fmt.Errorf("capture: %w; or capture with --no-discard", err)
		}
		fmt.Fprintf(w, "trimmed in %.1f s (%d chunks discarded so far)\n", time.Since(start).Seconds(), discarded())
	}
	quiet := c.Duration("discard-settle")
	slack := int((256 << 10) / cs)
	settled, err := qemu.Settle(c.Context, discarded, quiet, slack, max(limit-time.Since(start), 0), 200*time.Millisecond)
	if err != nil {
		return err
	}
	if cfg.Discard {
		if err := vm.RestoreReporting(c.Context, time.Minute); err != nil {
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

// buildFromFiles builds an overlay of the VM in the given files.
func buildFromFiles(out string, base *overlay.Base, disk, memory, state, vmConfig string, opt overlay.BuildOptions) (*overlay.Summary, error) {
	in := &overlay.Input{}
	for img, p := range [2]string{disk, memory} {
		f, size, err := openImage(overlay.Image(img).String(), p)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		in.Images[img], in.Sizes[img] = f, size
	}
	var err error
	if in.State, err = readSmall("state", state, overlay.MaxStateSize); err != nil {
		return nil, err
	}
	if vmConfig != "" {
		if in.VMConfig, err = readSmall("vm-config", vmConfig, overlay.MaxVMConfigSize); err != nil {
			return nil, err
		}
	}
	return overlay.Build(out, base, in, opt)
}

type vmWriter struct{ vm *qemu.VM }

func (w vmWriter) Write(p []byte) (int, error) { return len(p), w.vm.Type(string(p)) }

func launchCmd(c *cli.Context) error {
	if c.NArg() < 1 {
		return errors.New("launch: want OVERLAY (see --help)")
	}
	bin, err := qemu.CheckBinary(c.String("qemu"))
	if err != nil {
		return err
	}
	accel, err := qemu.ResolveAccel(c.String("accel"))
	if err != nil {
		return err
	}
	ref := c.Args().First()
	sopt, err := sessionOptions(c, ref, "")
	if err != nil {
		return err
	}
	opt := launch.Options{Session: sopt, QEMU: bin, Accel: accel, Extra: extra(c),
		Probe: c.String("probe"), ProbeTimeout: c.Duration("probe-timeout"), ExitAfterProbe: c.Bool("exit-after-probe"),
		Timeline: c.App.Writer, Console: consoleOut(c)}
	if st, err := os.Stat(ref); err == nil && st.IsDir() {
		opt.Dir = ref
	}
	if out := c.Path("trace-out"); out != "" {
		opt.Stopped = func(s *session.Session) error {
			if err := writeTrace(out, s.Mount.WriteTrace); err != nil {
				return fmt.Errorf("--trace-out: %w", err)
			}
			return nil
		}
	}
	return launch.Run(c.Context, opt)
}

// extra is what follows "--": arguments passed on to QEMU.
func extra(c *cli.Context) []string {
	_, e := extraArgs(c)
	return e
}
