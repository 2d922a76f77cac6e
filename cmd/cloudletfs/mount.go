package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	cfs "github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/serve"
	"github.com/cloudletfs/cloudletfs/session"
)

var (
	headerFlag = &cli.StringSliceFlag{Name: "header", Usage: "HTTP header sent with every request, e.g. 'Authorization: Bearer TOKEN' (repeatable; never logged)"}
	caCertFlag = &cli.PathFlag{Name: "ca-cert", Usage: "PEM file of certificates to trust for https:// besides the system roots"}
)

var policyFlag = &cli.StringFlag{Name: "policy", Value: string(order.StreamDemand),
	Usage: "stream+demand (stream segments in order, reads jump ahead) or demand-only (fetch only what reads ask for)"}

func runtimeCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "serve",
			Usage:     "serve overlay files over HTTP with Range support, optionally over an emulated link",
			UsageText: "cloudletfs serve [--addr 127.0.0.1:8080] [--rate RATE] [--rtt DURATION] DIR",
			Description: `Serves the regular files under DIR, never anything outside it. --rate is one token
bucket shared by all connections, like one access link (e.g. 38mbit, 1gbit, 5MB for
bytes per second); --rtt delays every request by one round trip. Each request is
logged with its path, range, bytes and duration.`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "addr", Value: "127.0.0.1:8080", Usage: "address to listen on"},
				&cli.StringFlag{Name: "rate", Value: "0", Usage: "link rate, e.g. 38mbit (0: unlimited)"},
				&cli.DurationFlag{Name: "rtt", Usage: "round-trip time added to each request, e.g. 20ms"},
				&cli.StringFlag{Name: "token", EnvVars: []string{"CLOUDLETFS_SERVE_TOKEN"}, Usage: "require 'Authorization: Bearer TOKEN' on every request"},
			},
			Action: serveCmd,
		},
		{
			Name:      "mount",
			Usage:     "mount an overlay so a VM can resume from it before it has arrived",
			UsageText: "cloudletfs mount [--base ID|NAME] [--trace-out FILE] [--fetch-timeout DURATION] [--fresh] OVERLAY MOUNTPOINT",
			Description: `OVERLAY is an http(s):// URL, an s3://BUCKET/KEY URL (see the README for the
endpoint and credentials), a file:// URL or a path. The mount appears as soon as the
overlay's metadata has arrived and shows disk/image, memory/image, state, vm.json,
stats and streams/. Segments stream in the background; a read of a chunk that has not
arrived fetches its segment ahead of the stream. The command serves until SIGINT,
SIGTERM or 'cloudletfs umount MOUNTPOINT', then unmounts and exits 0. Writes are kept
in the state dir, and a later mount of the same overlay shows them (not with --fresh).`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "base", Usage: "base VM, by ID or NAME (default: the overlay's own base ID)"},
				&cli.PathFlag{Name: "trace-out", Usage: "write the accesses seen, timed from ready, to FILE at unmount"},
				&cli.DurationFlag{Name: "fetch-timeout", Value: 30 * time.Second, Usage: "longest a read waits for its segment before failing with EIO"},
				&cli.BoolFlag{Name: "allow-other", Usage: "let users other than the mounting one use the mount"},
				&cli.BoolFlag{Name: "fresh", Usage: "discard what earlier mounts of the overlay wrote: do this before resuming the overlay's saved VM state again"},
				policyFlag, headerFlag, caCertFlag, cacheSizeFlag,
				&cli.BoolFlag{Name: "debug-fuse", Usage: "log every FUSE request"},
			},
			Action: mountCmd,
		},
		{
			Name:      "umount",
			Usage:     "unmount a cloudletfs mount; its daemon then exits",
			ArgsUsage: "MOUNTPOINT",
			Action:    umountCmd,
		},
		statusCommand(),
	}
}

func serveCmd(c *cli.Context) error {
	if err := need(c, 1, "one DIR to serve"); err != nil {
		return err
	}
	rate, err := serve.ParseRate(c.String("rate"))
	if err != nil || rate < 0 {
		return badFlag("--rate %q: want a link rate such as 38mbit, or 0 for no limit", c.String("rate"))
	}
	dir := c.Args().First()
	s, err := serve.New(dir, serve.Options{Rate: rate, RTT: c.Duration("rtt"), Log: logger(c), Token: c.String("token")})
	if err != nil {
		return err
	}
	defer s.Close()
	ln, err := net.Listen("tcp", c.String("addr"))
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-c.Context.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	link := "unlimited"
	if rate > 0 {
		link = fmt.Sprintf("%s/s", humanize.SI(rate*8, "bit"))
	}
	fmt.Fprintf(c.App.Writer, "serving %s on http://%s (link %s, rtt %s)\n", dir, ln.Addr(), link, c.Duration("rtt"))
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// sessionOptions are the options of a mount that the commands share.
func sessionOptions(c *cli.Context, ref, dir string) (session.Options, error) {
	limit, err := parseCacheSize(c)
	if err != nil {
		return session.Options{}, err
	}
	switch p := order.Policy(c.String("policy")); p {
	case order.StreamDemand, order.DemandOnly:
	default:
		return session.Options{}, badFlag("--policy %q: want %s or %s", p, order.StreamDemand, order.DemandOnly)
	}
	return session.Options{
		Overlay: ref, Mountpoint: dir, StateDir: c.String("state-dir"), Log: logger(c),
		Base: c.String("base"), Headers: c.StringSlice("header"), CAFile: c.Path("ca-cert"),
		FetchTimeout: c.Duration("fetch-timeout"), Policy: order.Policy(c.String("policy")),
		CacheSize: limit, AllowOther: c.Bool("allow-other"), Debug: c.Bool("debug-fuse"),
	}, nil
}

// limitMemory sets a soft memory limit under the bound a mount of the
// overlay stays under (cfs.MemoryBound), for a process that only serves
// the mount: the garbage collector's slack would otherwise double what
// the mount holds. GOMEMLIMIT overrides it. The program's text and stacks
// take the rest of the bound.
func limitMemory(h *overlay.Header) {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfs.MemoryBound(h) - 48<<20)
	}
}

// stopRequests turns SIGINT and SIGTERM into stop requests. It is
// installed before anything is mounted; c.Context ends on the first
// signal too, which stops a mount that is still starting.
func stopRequests() (<-chan struct{}, func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		for {
			select {
			case <-sigs:
				select {
				case stop <- struct{}{}:
				case <-done:
					return
				}
			case <-done:
				return
			}
		}
	}()
	return stop, func() { signal.Stop(sigs); close(done) }
}

func mountCmd(c *cli.Context) error {
	if err := need(c, 2, "OVERLAY and MOUNTPOINT"); err != nil {
		return err
	}
	stop, release := stopRequests()
	defer release()
	log := logger(c)
	opt, err := sessionOptions(c, c.Args().Get(0), c.Args().Get(1))
	if err != nil {
		return err
	}
	opt.Fresh = c.Bool("fresh")
	s, err := session.Open(c.Context, opt)
	if err != nil {
		return err
	}
	defer s.Close()
	limitMemory(s.Overlay.Header)
	stats := s.Fetcher.Stats()
	fmt.Fprintf(c.App.Writer, "ready in %s: %s mounted on %s (%d of %d segments present)\n",
		time.Since(s.Start).Round(time.Millisecond), s.Shown, s.Dir, stats.SegmentsPresent, stats.Segments)
	go func() {
		<-s.Fetcher.Complete()
		log.Info().Str("since_start", time.Since(s.Start).Round(time.Millisecond).String()).Msg("overlay complete: every segment is present")
	}()
	s.Serve(stop)
	s.Fetcher.Close()
	if out := c.Path("trace-out"); out != "" {
		if err := writeTrace(out, s.Mount.WriteTrace); err != nil {
			return fmt.Errorf("--trace-out: %w", err)
		}
	}
	fmt.Fprintf(c.App.Writer, "unmounted %s\n", s.Dir)
	return nil
}

// resolveBase finds the base named by ref, or the one the overlay records.
var resolveBase = session.ResolveBase

// writeTrace writes a trace atomically.
func writeTrace(path string, write func(io.Writer) error) error {
	return overlay.WriteFile(context.Background(), path, func(w io.Writer) error {
		fmt.Fprintf(w, "# cloudletfs trace: <seconds since ready> <disk|memory> <chunk index> <bytes read> <seconds the read took>\n")
		return write(w)
	})
}

func umountCmd(c *cli.Context) error {
	if err := need(c, 1, "one MOUNTPOINT"); err != nil {
		return err
	}
	abs, err := resolveMountpoint(c.Args().First())
	if err != nil {
		return err
	}
	fstype, err := session.MountType(abs)
	if err != nil {
		return err
	}
	switch fstype {
	case "":
		return fmt.Errorf("%s is not mounted", abs)
	case session.FSType:
	default:
		return fmt.Errorf("umount %s: not a cloudletfs mount but %s: leaving it alone (use umount(8) for other file systems)", abs, fstype)
	}
	if session.IsDead(abs) {
		if err := session.CleanDead(abs); err != nil {
			return fmt.Errorf("umount %s: %w", abs, err)
		}
		fmt.Fprintf(c.App.Writer, "cleaned a dead mount at %s (its daemon had stopped)\n", abs)
		return nil
	}
	if err := syscall.Unmount(abs, 0); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			holders, _ := session.Holders(abs)
			return fmt.Errorf("umount %s: %w", abs, &session.BusyError{Dir: abs, Holders: holders})
		}
		return fmt.Errorf("umount %s: %w", abs, err)
	}
	fmt.Fprintf(c.App.Writer, "unmounted %s\n", abs)
	return nil
}

// resolveMountpoint makes path absolute and follows symlinks, as mountinfo
// names mounts by their real path. The last component is never looked
// into: the root of a mount whose daemon died answers only ENOTCONN.
func resolveMountpoint(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	for range 40 { // the kernel's own limit on links followed
		dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
		if err != nil {
			return "", err
		}
		abs = filepath.Join(dir, filepath.Base(abs))
		fi, err := os.Lstat(abs)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			return abs, nil
		}
		target, err := os.Readlink(abs)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(dir, target)
		}
		abs = filepath.Clean(target)
	}
	return "", fmt.Errorf("%s: too many levels of symbolic links", path)
}
