package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/fetch"
	cfs "github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/serve"
	"github.com/cloudletfs/cloudletfs/store"
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
			Description: `OVERLAY is an http(s):// URL, a file:// URL or a path. The mount appears as soon as the
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
		{
			Name:      "status",
			Usage:     "show a mount's progress until the overlay is complete",
			ArgsUsage: "MOUNTPOINT",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "once", Usage: "print the current state once and exit"},
				&cli.DurationFlag{Name: "interval", Value: 500 * time.Millisecond, Usage: "refresh interval"},
			},
			Action: statusCmd,
		},
	}
}

func serveCmd(c *cli.Context) error {
	if err := need(c, 1, "one DIR to serve"); err != nil {
		return err
	}
	rate, err := serve.ParseRate(c.String("rate"))
	if err != nil {
		return fmt.Errorf("--rate: %w", err)
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
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

// checkMountpoint refuses a missing mountpoint, one that is not a
// directory, and one that already has something mounted on it. A dead
// cloudletfs mount, left by a daemon that was killed, is cleaned away.
func checkMountpoint(dir string, log zerolog.Logger) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if fstype, err := mountType(abs); err != nil {
		return "", err
	} else if fstype != "" {
		if !isDeadMount(abs) {
			return "", fmt.Errorf("mountpoint %s is busy: something is already mounted there", dir)
		}
		if fstype != "fuse.cloudletfs" {
			return "", fmt.Errorf("mountpoint %s holds a dead %s mount, not cloudletfs's: unmount it first", dir, fstype)
		}
		// Lazily: a process of the crashed session may still hold files
		// there; they keep failing, and the mountpoint is free now.
		if err := syscall.Unmount(abs, syscall.MNT_DETACH); err != nil {
			return "", fmt.Errorf("mountpoint %s holds a dead mount that cannot be cleaned: %w", dir, err)
		}
		log.Warn().Str("mountpoint", abs).Msg("cleaned a dead mount left by a cloudletfs daemon that stopped without unmounting")
	}
	st, err := os.Stat(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("mountpoint %s does not exist: create the directory first", dir)
		}
		return "", fmt.Errorf("mountpoint %s: %w", dir, err)
	}
	if !st.IsDir() {
		return "", fmt.Errorf("mountpoint %s is not a directory", dir)
	}
	return abs, nil
}

// isDeadMount reports whether the FUSE daemon behind the mount at abs is
// gone: every access then fails with ENOTCONN. Cached attributes can hide
// that from a plain stat, so it lists the directory. A daemon that is alive
// but does not answer is not dead; the listing is given up on after a
// moment so that its caller does not hang with it.
func isDeadMount(abs string) bool {
	res := make(chan error, 1)
	go func() {
		_, err := os.ReadDir(abs)
		res <- err
	}()
	select {
	case err := <-res:
		return errors.Is(err, syscall.ENOTCONN)
	case <-time.After(2 * time.Second):
		return false
	}
}

// mountType returns the file system type of the mount at abs, or "" when
// abs is not a mount point, from /proc/self/mountinfo.
func mountType(abs string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	fstype := ""
	for sc.Scan() {
		// ID parent major:minor root mountpoint options [optional...] - type source super
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) > 4 && unescapeMount(fields[4]) == abs {
			_, after, _ := strings.Cut(line, " - ")
			fstype = "unknown"
			if t := strings.Fields(after); len(t) > 0 {
				fstype = t[0]
			}
			// The last match is the mount on top.
		}
	}
	return fstype, sc.Err()
}

// isMountpoint reports whether abs is a mount point.
func isMountpoint(abs string) (bool, error) {
	t, err := mountType(abs)
	return t != "", err
}

// unescapeMount undoes mountinfo's octal escapes of space, tab, newline and
// backslash.
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// session is a live mount: its fetcher, file system and the store behind
// them.
type session struct {
	shown string // the overlay's URL fit to show: no password
	dir   string
	start time.Time
	f     *fetch.Fetcher
	m     *cfs.Mount
	o     *overlay.Overlay
	base  *store.Base
	cache *store.Cache
	close []func()
}

// sessionOptions tune openSession.
type sessionOptions struct {
	timeout time.Duration // the fetch timeout
	// fresh discards data written through earlier mounts of the overlay
	// first: a VM resumed from the overlay's saved state must see the disk
	// that state was saved with.
	fresh bool
	// check, if set, vets the overlay and its base before anything is
	// discarded or mounted.
	check func(o *overlay.Overlay, base *store.Base) error
}

// openSession fetches an overlay's metadata, checks its base in the
// registry, and mounts it at dir. It holds the registry only while it
// starts; the mount then holds just its overlay's cache, so other commands
// and mounts of other overlays can run beside it. Everything it opens is
// released by finish.
func openSession(c *cli.Context, ref, dir string, opt sessionOptions) (*session, error) {
	timeout := opt.timeout
	s := &session{start: time.Now(), shown: fetch.Redact(ref)}
	ok := false
	defer func() {
		if !ok {
			s.finish()
		}
	}()
	log := logger(c)
	if timeout <= 0 {
		return nil, fmt.Errorf("--fetch-timeout %s: want a positive duration", timeout)
	}
	var demandOnly bool
	switch c.String("policy") {
	case "", string(order.StreamDemand):
	case string(order.DemandOnly):
		demandOnly = true // no streamer: only what reads ask for is fetched
	default:
		return nil, fmt.Errorf("--policy %q: want stream+demand or demand-only", c.String("policy"))
	}
	abs, err := checkMountpoint(dir, log)
	if err != nil {
		return nil, err
	}
	s.dir = abs
	header, err := fetch.ParseHeaders(c.StringSlice("header"))
	if err != nil {
		return nil, err
	}
	tlsConfig, err := fetch.TLSConfig(c.Path("ca-cert"))
	if err != nil {
		return nil, err
	}
	src, err := fetch.OpenSource(ref, fetch.DefaultClient(tlsConfig), header)
	if err != nil {
		return nil, err
	}
	s.close = append(s.close, func() { src.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	o, err := fetch.OpenOverlay(ctx, src)
	cancel()
	if err != nil {
		return nil, err
	}
	s.o = o
	st, err := openStore(c)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	if s.base, err = resolveBase(st, c.String("base"), o, s.shown); err != nil {
		return nil, err
	}
	base, closeBase, err := store.OpenImages(s.base)
	if err != nil {
		return nil, err
	}
	s.close = append(s.close, closeBase)
	if err := o.CheckBase(base); err != nil {
		return nil, fmt.Errorf("overlay %s: %w", s.shown, err)
	}
	if opt.check != nil {
		if err := opt.check(o, s.base); err != nil {
			return nil, err
		}
	}
	limit, err := parseCacheSize(c)
	if err != nil {
		return nil, err
	}
	cache, err := st.OpenCache(o.ID, int(o.Header.ChunkSize), [2]int64{o.Header.ImageSize(overlay.Disk), o.Header.ImageSize(overlay.Memory)})
	if errors.Is(err, store.ErrInUse) {
		return nil, fmt.Errorf("overlay %s is already mounted by another cloudletfs process: unmount it first", s.shown)
	}
	if err != nil {
		return nil, err
	}
	s.cache = cache
	if opt.fresh {
		if written, err := cache.CowChunks(); err != nil {
			return nil, err
		} else if len(written) > 0 {
			if err := cache.DropWritten(); err != nil {
				return nil, err
			}
			log.Warn().Int("chunks", len(written)).Msg("discarded data written by an earlier run of this overlay: the VM resumes from the overlay's saved state, which that data does not match")
		}
	}
	// After the cache is let go: what this mount fetched counts against
	// the cap too.
	s.close = append(s.close, func() { collectCaches(c, log, limit) })
	s.close = append(s.close, func() { cache.Close() })
	if freed, err := st.GC(limit, o.ID); err != nil {
		log.Warn().Err(err).Msg("cache: collecting least recently used overlays failed")
	} else if freed > 0 {
		log.Info().Str("freed", humanize.IBytes(uint64(freed))).Msg("cache: removed least recently used overlays")
	}
	if err := st.Close(); err != nil {
		return nil, err
	}
	if s.f, err = fetch.New(src, o, base, cache, fetch.Options{Timeout: timeout, Log: log}); err != nil {
		return nil, fmt.Errorf("overlay %s: %w", s.shown, err)
	}
	s.close = append(s.close, s.f.Close)
	if s.m, err = cfs.New(abs, s.f, cfs.Options{Log: log, AllowOther: c.Bool("allow-other"), Debug: c.Bool("debug-fuse")}); err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if !demandOnly {
		s.f.Start()
	}
	ok = true
	return s, nil
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

// collectCaches removes the least recently used caches of overlays that
// are not mounted until they fit limit.
func collectCaches(c *cli.Context, log zerolog.Logger, limit int64) {
	if limit == math.MaxInt64 {
		return
	}
	st, err := openStore(c)
	if err != nil {
		log.Warn().Err(err).Msg("cache: could not open the state dir to keep the cache under --cache-size")
		return
	}
	defer st.Close()
	if freed, err := st.GC(limit); err != nil {
		log.Warn().Err(err).Msg("cache: collecting least recently used overlays failed")
	} else if freed > 0 {
		log.Info().Str("freed", humanize.IBytes(uint64(freed))).Msg("cache: removed least recently used overlays to stay under --cache-size")
	}
}

// unmount wakes every waiting reader, so the kernel can let go, and
// unmounts, lazily if something still holds the mount.
func (s *session) unmount() {
	s.f.Close()
	if err := s.m.Unmount(); err != nil {
		syscall.Unmount(s.dir, syscall.MNT_DETACH)
	}
	// Let the file system finish its last requests before what it reads
	// from is closed.
	done := make(chan struct{})
	go func() { s.m.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
}

// finish releases what the session opened, newest first.
func (s *session) finish() {
	for i := len(s.close) - 1; i >= 0; i-- {
		s.close[i]()
	}
	s.close = nil
}

func mountCmd(c *cli.Context) error {
	if err := need(c, 2, "OVERLAY and MOUNTPOINT"); err != nil {
		return err
	}
	log := logger(c)
	ref := c.Args().Get(0)
	s, err := openSession(c, ref, c.Args().Get(1), sessionOptions{timeout: c.Duration("fetch-timeout"), fresh: c.Bool("fresh")})
	if err != nil {
		return err
	}
	defer s.finish()
	limitMemory(s.o.Header)
	stats := s.f.Stats()
	fmt.Fprintf(c.App.Writer, "ready in %s: %s mounted on %s (%d of %d segments present)\n",
		time.Since(s.start).Round(time.Millisecond), s.shown, s.dir, stats.SegmentsPresent, stats.Segments)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		<-s.f.Complete()
		log.Info().Str("since_start", time.Since(s.start).Round(time.Millisecond).String()).Msg("overlay complete: every segment is present")
	}()
	go func() {
		sig := <-sigs
		log.Info().Str("signal", sig.String()).Msg("unmounting")
		s.unmount()
	}()
	s.m.Wait()
	s.f.Close()
	if out := c.Path("trace-out"); out != "" {
		if err := writeTrace(out, s.m.WriteTrace); err != nil {
			return fmt.Errorf("--trace-out: %w", err)
		}
	}
	fmt.Fprintf(c.App.Writer, "unmounted %s\n", s.dir)
	return nil
}

// resolveBase finds the base named by --base, or the one the overlay records.
func resolveBase(st *store.Store, ref string, o *overlay.Overlay, src string) (*store.Base, error) {
	if ref != "" {
		return st.Resolve(ref)
	}
	b, err := st.Resolve(o.Header.BaseID.String())
	if err != nil {
		return nil, fmt.Errorf("overlay %s needs base %s, which is not in the registry: import it, or name one with --base", src, o.Header.BaseID)
	}
	return b, nil
}

// writeTrace writes a trace atomically.
func writeTrace(path string, write func(io.Writer) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	fmt.Fprintf(tmp, "# cloudletfs trace: <seconds since ready> <disk|memory> <chunk index> <bytes read> <seconds the read took>\n")
	if err := write(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func umountCmd(c *cli.Context) error {
	if err := need(c, 1, "one MOUNTPOINT"); err != nil {
		return err
	}
	abs, err := filepath.Abs(c.Args().First())
	if err != nil {
		return err
	}
	if mounted, err := isMountpoint(abs); err != nil {
		return err
	} else if !mounted {
		return fmt.Errorf("%s is not mounted", abs)
	}
	if isDeadMount(abs) {
		// Lazily: a process of the crashed session may still hold files
		// there.
		if err := syscall.Unmount(abs, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("umount %s: a dead mount that cannot be cleaned: %w", abs, err)
		}
		fmt.Fprintf(c.App.Writer, "cleaned a dead mount at %s (its daemon had stopped)\n", abs)
		return nil
	}
	if err := syscall.Unmount(abs, 0); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("umount %s: busy: a process still has files open there (stop the VM first)", abs)
		}
		return fmt.Errorf("umount %s: %w", abs, err)
	}
	fmt.Fprintf(c.App.Writer, "unmounted %s\n", abs)
	return nil
}

func statusCmd(c *cli.Context) error {
	if err := need(c, 1, "one MOUNTPOINT"); err != nil {
		return err
	}
	path := filepath.Join(c.Args().First(), "stats")
	w := c.App.Writer
	var lastBytes int64
	lastT, first := time.Now(), true
	tty := newProgress(c.App.Writer) != nil
	for {
		b, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("status: %w (is a cloudletfs overlay mounted there?)", err)
		}
		var s fetch.Stats
		if err := json.Unmarshal(b, &s); err != nil {
			return fmt.Errorf("status: %s: %w", path, err)
		}
		now := time.Now()
		rate := -1.0
		if !first {
			rate = float64(s.BytesFetched-lastBytes) / now.Sub(lastT).Seconds()
		}
		first = false
		lastBytes, lastT = s.BytesFetched, now
		share := 1.0
		if s.Segments > 0 {
			share = float64(s.SegmentsPresent) / float64(s.Segments)
		}
		const width = 30
		bar := strings.Repeat("#", int(share*width)) + strings.Repeat("-", width-int(share*width))
		line := fmt.Sprintf("[%s] %5.1f%%  %d/%d segments  %s fetched  %d demand fetches  stall %.0f ms (p99 %.0f ms)",
			bar, 100*share, s.SegmentsPresent, s.Segments, humanize.IBytes(uint64(s.BytesFetched)),
			s.DemandFetches, s.StallTotalMs, s.StallP99Ms)
		if rate >= 0 {
			line += fmt.Sprintf("  %s/s", humanize.IBytes(uint64(rate)))
		}
		if s.FetchErrors > 0 || s.Timeouts > 0 {
			line += fmt.Sprintf("  errors %d, timeouts %d", s.FetchErrors, s.Timeouts)
		}
		if tty {
			fmt.Fprintf(w, "\r\033[K%s", line)
		} else {
			fmt.Fprintln(w, line)
		}
		if s.Complete || c.Bool("once") {
			if tty {
				fmt.Fprintln(w)
			}
			return nil
		}
		time.Sleep(c.Duration("interval"))
	}
}
