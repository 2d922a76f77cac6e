package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/cloudletfs/cloudletfs/capture"
	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
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

// qemuFlags checks the --qemu binary and resolves --accel.
func qemuFlags(c *cli.Context) (bin, accel string, err error) {
	if bin, err = qemu.CheckBinary(c.String("qemu")); err != nil {
		return "", "", err
	}
	if accel, err = qemu.ResolveAccel(c.String("accel")); err != nil {
		return "", "", err
	}
	return bin, accel, nil
}

// readyWait says, from the flags, when the VM is ready to be saved: a
// console line matching --ready, --ready-after, or Enter on a terminal.
func readyWait(c *cli.Context) (capture.ReadyFunc, error) {
	exited := func(vm *qemu.VM) error { return fmt.Errorf("QEMU exited; last console lines:\n%s", vm.Tail(15)) }
	switch {
	case c.String("ready") != "":
		re, err := regexp.Compile(c.String("ready"))
		if err != nil {
			return nil, badFlag("--ready: %v", err)
		}
		timeout := c.Duration("ready-timeout")
		return func(ctx context.Context, vm *qemu.VM) error { return vm.WaitConsole(ctx, re, timeout) }, nil
	case c.Duration("ready-after") > 0:
		after := c.Duration("ready-after")
		return func(ctx context.Context, vm *qemu.VM) error {
			select {
			case <-time.After(after):
				return nil
			case <-vm.Exited():
				return exited(vm)
			case <-ctx.Done():
				return ctx.Err()
			}
		}, nil
	case term.IsTerminal(int(os.Stdin.Fd())):
		return func(ctx context.Context, vm *qemu.VM) error {
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
				return exited(vm)
			case <-ctx.Done():
				return ctx.Err()
			}
		}, nil
	}
	return nil, errors.New("say when the VM is ready: --ready REGEX or --ready-after DURATION")
}

func baseCreateCmd(c *cli.Context) error {
	bin, accel, err := qemuFlags(c)
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
	ready, err := readyWait(c)
	if err != nil {
		return err
	}
	cfg := qemu.Config{Machine: c.String("machine"), CPU: c.String("cpu"), SMP: c.Int("smp"), MemoryMiB: int(memSize >> 20),
		DiskIf: c.String("disk-interface"), NIC: c.String("nic"), GuestPort: c.Int("guest-port"), Append: c.String("append"),
		Extra: extra(c), Discard: !c.Bool("no-discard"), Balloon: !c.Bool("no-discard")}
	b, dir, err := capture.CreateBase(c.Context, capture.BaseOptions{StateDir: c.String("state-dir"), Name: c.String("name"),
		Disk: c.Path("disk"), Kernel: c.Path("kernel"), Initrd: c.Path("initrd"), Config: cfg,
		QEMU: bin, Accel: accel, Console: consoleOut(c), Ready: ready, Log: logger(c)})
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "created base %q in %s: memory %s, disk %s, state %s\n", b.Name, dir,
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

func overlayCaptureCmd(c *cli.Context) error {
	bin, accel, err := qemuFlags(c)
	if err != nil {
		return err
	}
	codec, err := overlay.ParseCodec(c.String("codec"))
	if err != nil || codec == overlay.CodecNone {
		return badFlag("--codec %q: want xz or zstd", c.String("codec"))
	}
	if c.Duration("discard-settle") <= 0 || c.Duration("discard-timeout") <= 0 {
		return badFlag("--discard-settle and --discard-timeout want positive durations, e.g. 5s and 5m")
	}
	opt := capture.Options{StateDir: c.String("state-dir"), Base: c.String("base"), QEMU: bin, Accel: accel,
		Interactive: os.Stdin, NoDiscard: c.Bool("no-discard"),
		DiscardSettle: c.Duration("discard-settle"), DiscardTimeout: c.Duration("discard-timeout"),
		Codec: codec, Jobs: c.Int("jobs"), Output: c.Path("output"),
		Out: c.App.Writer, Notes: c.App.ErrWriter, Console: consoleOut(c), Log: logger(c)}
	if p := c.Path("script"); p != "" {
		if opt.Script, err = os.ReadFile(p); err != nil {
			return fmt.Errorf("--script: %w", err)
		}
		if c.String("ready") == "" {
			return errors.New("--script needs --ready: the console line that says the customization is done")
		}
		if opt.Ready, err = readyWait(c); err != nil {
			return err
		}
	}
	if p := c.Path("trace-out"); p != "" {
		opt.TraceOut = func(t *order.Trace) error {
			if err := writeTrace(p, func(w io.Writer) error { return order.Write(w, t) }); err != nil {
				return fmt.Errorf("--trace-out: %w", err)
			}
			return nil
		}
	}
	r, err := capture.Capture(c.Context, opt)
	if err != nil {
		return err
	}
	printSummary(c.App.Writer, opt.Output, r.Summary, codec, r.Took)
	fmt.Fprintf(c.App.Writer, "stream order: the %d chunks the VM touched while it ran come first\n", r.Touched)
	return nil
}

func launchCmd(c *cli.Context) error {
	if c.NArg() < 1 {
		return errors.New("launch: want OVERLAY (see --help)")
	}
	bin, accel, err := qemuFlags(c)
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
