// Package session is one mount of an overlay, from start to end: it fetches
// the overlay's metadata, checks the base in the registry, runs cache GC,
// discards earlier writes for --fresh, mounts the file system with its FUSE
// device closed on exec, serves it, and unmounts and releases everything in
// order. `mount`, `launch` and `overlay capture` all run their mounts
// through it, and so do the tests, so the order they exercise is the real
// one. It takes plain options and knows nothing of the command line or of
// QEMU.
//
// The unmount order: a stop asked for while processes hold files of the
// mount (a VM) is refused and the holders are named; only a forced stop
// wakes waiting readers and detaches lazily. Close then waits for the file
// system's last requests, closes the fetcher, the cache and the base, and
// last collects caches over the size cap.
package session

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	cfs "github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// Options say what to mount and how.
type Options struct {
	Overlay    string // an http(s):// or file:// URL, or a path
	Mountpoint string // an existing directory
	StateDir   string // the store: base registry and caches
	Log        zerolog.Logger
	Base       string   // base by ID or name; "" takes the overlay's own base ID
	Headers    []string // "Name: value" lines sent with every request
	CAFile     string   // PEM certificates to trust besides the system roots
	// FetchTimeout bounds a read's wait for its segment, and the metadata
	// fetch at the start.
	FetchTimeout time.Duration
	// MetadataTimeout, if set, bounds the metadata fetch instead of
	// FetchTimeout: a mount whose reads must fail fast can still come up
	// on a loaded link.
	MetadataTimeout time.Duration
	// NoProgress cuts an HTTP request whose body stops arriving for this
	// long, to retry it on a new connection; 0 is fetch.DefaultNoProgress.
	NoProgress time.Duration
	Policy     order.Policy // stream+demand (the default) or demand-only
	// Fresh discards data written through earlier mounts of the overlay
	// first: a VM resumed from the overlay's saved state must see the disk
	// that state was saved with.
	Fresh bool
	// DropWritten discards, once the file system is unmounted and before
	// the cache closes, everything written through this mount: a capture
	// reads what the guest wrote into its overlay and must not leave it to
	// the next run of the base.
	DropWritten bool
	// CacheSize caps the chunk cache of all overlays; 0 is no cap.
	CacheSize  int64
	AllowOther bool // let users other than the mounting one in
	Debug      bool // log every FUSE request
	NoDiscard  bool // the images refuse discards (fs.Options.NoDiscard)
	// NetworkParents refuses the parents of a layered overlay that are
	// not http://, https:// or s3:// URLs: a cloudlet that refuses file://
	// overlays must not read local files as parents either.
	NetworkParents bool
	// Staged, if set, is a directory of segments sent ahead by a handoff,
	// named by their sha256: they are read from there, not fetched.
	Staged string
	// Check, if set, vets the overlay and its base before anything is
	// discarded or mounted.
	Check func(o *overlay.Overlay, base *store.Base) error
}

// Session is a live mount: its fetcher, file system and the store behind
// them.
type Session struct {
	Shown   string // the overlay's URL fit to show: no password
	Dir     string // the absolute mountpoint
	Start   time.Time
	Fetcher *fetch.Fetcher
	Mount   *cfs.Mount
	Overlay *overlay.Overlay
	Base    *store.Base
	Cache   *store.Cache

	log     zerolog.Logger
	mounted bool
	close   []func()
	parents []*fetch.Fetcher // a layered overlay's, nearest first
}

// openParents opens the chain of parents of a layered overlay, each with
// its own cache and a fetcher that reads only what the parent itself
// carries, and returns the nearest's fetcher (nil for an overlay with no
// parent). A parent this cloudlet has run is read from its cache; the rest
// comes from the parent's location, resolved against the layer's. Requests
// to a parent on another host go without the layer's headers.
func (s *Session) openParents(ctx context.Context, opt Options, src fetch.Source, o *overlay.Overlay, base *overlay.Base, metaTimeout time.Duration, header http.Header, tlsConfig *tls.Config) (*fetch.Fetcher, error) {
	if !o.Header.Layered() {
		return nil, nil
	}
	client := fetch.DefaultClient(tlsConfig)
	open := func(ref string) (fetch.Source, error) {
		if u, err := url.Parse(ref); opt.NetworkParents && (err != nil || u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "s3") {
			return nil, fmt.Errorf("%s is not an http://, https:// or s3:// URL, and this cloudlet reads no local files (--allow-file)", fetch.Redact(ref))
		}
		h := header
		if !sameHost(ref, opt.Overlay) {
			h = nil
		}
		return fetch.OpenSource(ref, client, h)
	}
	mctx, cancel := context.WithTimeout(ctx, metaTimeout)
	chain, err := fetch.OpenParents(mctx, o, opt.Overlay, open)
	cancel()
	if err != nil {
		return nil, err
	}
	for _, l := range chain {
		s.close = append(s.close, func() { l.Source.Close() })
	}
	st, err := store.Open(opt.StateDir, s.log)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	var below *fetch.Fetcher
	for i := len(chain) - 1; i >= 0; i-- {
		l := chain[i]
		po := l.Overlay
		shown := fetch.Redact(l.Ref)
		cache, err := st.OpenCache(po.ID, int(po.Header.ChunkSize), [2]int64{po.Header.ImageSize(overlay.Disk), po.Header.ImageSize(overlay.Memory)})
		if errors.Is(err, store.ErrInUse) {
			return nil, fmt.Errorf("parent overlay %s (%s) of %s is mounted by another cloudletfs process, a VM run from it: stop that first", po.ID.Short(), shown, s.Shown)
		}
		if err != nil {
			return nil, err
		}
		s.close = append(s.close, func() {
			if err := cache.Close(); err != nil {
				s.log.Error().Err(err).Str("overlay", shown).Msg("closing the parent overlay's cache")
			}
		})
		f, err := fetch.New(l.Source, po, base, cache, fetch.Options{Timeout: opt.FetchTimeout, Log: s.log, Parent: below, Original: true, Location: shown})
		if err != nil {
			return nil, fmt.Errorf("parent overlay %s: %w", shown, err)
		}
		s.close = append(s.close, f.Close)
		s.parents = append([]*fetch.Fetcher{f}, s.parents...)
		below = f
	}
	return below, nil
}

// sameHost reports whether two references name the same scheme and host.
func sameHost(a, b string) bool {
	ua, err1 := url.Parse(a)
	ub, err2 := url.Parse(b)
	return err1 == nil && err2 == nil && ua.Scheme == ub.Scheme && ua.Host == ub.Host
}

// Open fetches an overlay's metadata, checks its base in the registry, and
// mounts it. It holds the registry only while it starts; the mount then
// holds just its overlay's cache, so other commands and mounts of other
// overlays can run beside it. Everything it opens is released by Close. A
// cancelled ctx stops it at the next step.
func Open(ctx context.Context, opt Options) (*Session, error) {
	s := &Session{Start: time.Now(), Shown: fetch.Redact(opt.Overlay), log: opt.Log}
	ok := false
	defer func() {
		if !ok {
			s.Close()
		}
	}()
	log := opt.Log
	if opt.FetchTimeout <= 0 {
		return nil, fmt.Errorf("--fetch-timeout %s: want a positive duration", opt.FetchTimeout)
	}
	var demandOnly bool
	switch opt.Policy {
	case "", order.StreamDemand:
	case order.DemandOnly:
		demandOnly = true // no streamer: only what reads ask for is fetched
	default:
		return nil, fmt.Errorf("--policy %q: want stream+demand or demand-only", opt.Policy)
	}
	limit := opt.CacheSize
	if limit <= 0 {
		limit = math.MaxInt64
	}
	abs, err := checkMountpoint(opt.Mountpoint, log)
	if err != nil {
		return nil, err
	}
	s.Dir = abs
	header, err := fetch.ParseHeaders(opt.Headers)
	if err != nil {
		return nil, err
	}
	tlsConfig, err := fetch.TLSConfig(opt.CAFile)
	if err != nil {
		return nil, err
	}
	src, err := fetch.OpenSource(opt.Overlay, fetch.DefaultClient(tlsConfig), header)
	if err != nil {
		return nil, err
	}
	s.close = append(s.close, func() { src.Close() })
	if h, ok := src.(interface{ SetNoProgress(time.Duration) }); ok && opt.NoProgress > 0 {
		h.SetNoProgress(opt.NoProgress)
	}
	metaTimeout := opt.FetchTimeout
	if opt.MetadataTimeout > 0 {
		metaTimeout = opt.MetadataTimeout
	}
	mctx, cancel := context.WithTimeout(ctx, metaTimeout)
	o, err := fetch.OpenOverlay(mctx, src)
	cancel()
	if err != nil {
		return nil, err
	}
	s.Overlay = o
	if opt.Staged != "" {
		src = fetch.Staged(src, o, opt.Staged)
	}
	st, err := store.Open(opt.StateDir, log)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	if s.Base, err = ResolveBase(st, opt.Base, o, s.Shown); err != nil {
		return nil, err
	}
	base, closeBase, err := store.OpenImages(s.Base)
	if err != nil {
		return nil, err
	}
	s.close = append(s.close, closeBase)
	if err := o.CheckBase(base); err != nil {
		return nil, fmt.Errorf("overlay %s: %w", s.Shown, err)
	}
	if opt.Check != nil {
		if err := opt.Check(o, s.Base); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cache, err := st.OpenCache(o.ID, int(o.Header.ChunkSize), [2]int64{o.Header.ImageSize(overlay.Disk), o.Header.ImageSize(overlay.Memory)})
	if errors.Is(err, store.ErrInUse) {
		return nil, fmt.Errorf("overlay %s is already mounted by another cloudletfs process: unmount it first", s.Shown)
	}
	if err != nil {
		return nil, err
	}
	s.Cache = cache
	if opt.Fresh {
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
	s.close = append(s.close, func() { collectCaches(opt.StateDir, log, limit) })
	s.close = append(s.close, func() {
		if err := cache.Close(); err != nil {
			log.Error().Err(err).Str("overlay", s.Shown).Msg("closing the overlay's cache: data written through the mount since the last fsync may be lost")
		}
	})
	if opt.DropWritten {
		// Runs before the cache closes: a closed cache refuses to drop.
		s.close = append(s.close, func() {
			if err := cache.DropWritten(); err != nil {
				log.Error().Err(err).Str("overlay", s.Shown).Msg("could not discard the data written through the mount; the next run with --fresh discards it")
			}
		})
	}
	if freed, err := st.GC(limit, o.ID); err != nil {
		log.Warn().Err(err).Msg("cache: collecting least recently used overlays failed")
	} else if freed > 0 {
		log.Info().Str("freed", humanize.IBytes(uint64(freed))).Msg("cache: removed least recently used overlays")
	}
	if err := st.Close(); err != nil {
		return nil, err
	}
	parent, err := s.openParents(ctx, opt, src, o, base, metaTimeout, header, tlsConfig)
	if err != nil {
		return nil, err
	}
	if s.Fetcher, err = fetch.New(src, o, base, cache, fetch.Options{Timeout: opt.FetchTimeout, Log: log, Parent: parent, Location: s.Shown}); err != nil {
		return nil, fmt.Errorf("overlay %s: %w", s.Shown, err)
	}
	s.close = append(s.close, s.Fetcher.Close)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if s.Mount, err = mountFUSE(abs, s.Fetcher, cfs.Options{Log: log, AllowOther: opt.AllowOther, Debug: opt.Debug, NoDiscard: opt.NoDiscard}); err != nil {
		return nil, fmt.Errorf("mount %s: %w", opt.Mountpoint, err)
	}
	s.mounted = true
	if !demandOnly {
		for _, p := range s.parents {
			p.Start()
		}
		s.Fetcher.Start()
	}
	ok = true
	return s, nil
}

// ResolveBase finds the base named by ref, or the one the overlay records.
func ResolveBase(st *store.Store, ref string, o *overlay.Overlay, src string) (*store.Base, error) {
	if ref != "" {
		return st.Resolve(ref)
	}
	b, err := st.Resolve(o.Header.BaseID.String())
	if err != nil {
		return nil, fmt.Errorf("overlay %s needs base %s, which is not in the registry: import it, or name one with --base", src, o.Header.BaseID)
	}
	return b, nil
}

// collectCaches removes the least recently used caches of overlays that
// are not mounted until they fit limit.
func collectCaches(dir string, log zerolog.Logger, limit int64) {
	if limit == math.MaxInt64 {
		return
	}
	st, err := store.Open(dir, log)
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

// BusyError is a stop refused because processes hold files of the mount.
type BusyError struct {
	Dir     string
	Holders []Holder
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("%s is busy: held by %s: stop them first", e.Dir, describe(e.Holders))
}

// Unmount unmounts the file system. Without force it refuses, with a
// *BusyError naming the holders, while a process holds files of the mount:
// detaching under a running VM would leave it reading a mount that answers
// EIO for every chunk not yet fetched. With force it wakes every waiting
// reader, so the kernel can let go, and detaches lazily if something still
// holds the mount. Either way it returns once the file system has
// answered its last request, or after a bound.
func (s *Session) Unmount(force bool) error {
	if !s.mounted {
		return nil
	}
	if force {
		s.Fetcher.Close()
	}
	err := syscall.Unmount(s.Dir, 0)
	if errors.Is(err, syscall.EPERM) {
		// Not root: the mount was made through fusermount.
		err = s.Mount.Unmount()
	}
	if err != nil {
		holders, _ := Holders(s.Dir)
		if !force {
			if errors.Is(err, syscall.EBUSY) || len(holders) > 0 {
				return &BusyError{Dir: s.Dir, Holders: holders}
			}
			return fmt.Errorf("umount %s: %w", s.Dir, err)
		}
		if len(holders) > 0 {
			s.log.Warn().Str("held_by", describe(holders)).Msg("detaching the mount lazily: its holders now get errors for every chunk not yet fetched")
		}
		if err := syscall.Unmount(s.Dir, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("umount %s: %w", s.Dir, err)
		}
		// The kernel keeps a detached mount's connection while a holder
		// is left; the readers it had waiting are already woken.
		s.mounted = false
		s.wait(time.Second)
		return nil
	}
	s.mounted = false
	s.wait(10 * time.Second)
	return nil
}

// wait lets the file system finish its last requests before what it reads
// from is closed, for at most bound.
func (s *Session) wait(bound time.Duration) {
	done := make(chan struct{})
	go func() { s.Mount.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(bound):
	}
}

// Serve serves the mount until it is unmounted: from outside
// (`cloudletfs umount`), or on a stop request from stop (SIGINT or
// SIGTERM). A stop while processes hold files of the mount is refused: it
// logs who holds it and serves on. A second stop within forceWindow forces
// the unmount.
func (s *Session) Serve(stop <-chan struct{}) {
	const forceWindow = 5 * time.Second
	gone := make(chan struct{})
	go func() { s.Mount.Wait(); close(gone) }()
	var refused time.Time
	for {
		select {
		case <-gone:
			s.mounted = false
			return
		case <-stop:
		}
		force := !refused.IsZero() && time.Since(refused) < forceWindow
		err := s.Unmount(force)
		var busy *BusyError
		if errors.As(err, &busy) {
			refused = time.Now()
			s.log.Warn().Str("mountpoint", s.Dir).Str("held_by", describe(busy.Holders)).
				Msgf("not unmounting: processes hold files of the mount; it keeps serving them. Stop them first, or stop again within %s to detach the mount under them", forceWindow)
			continue
		}
		if err != nil {
			// Refused all the same: a second stop forces it.
			refused = time.Now()
			s.log.Error().Err(err).Msgf("unmount failed; serving on. Stop again within %s to detach the mount", forceWindow)
			continue
		}
		return
	}
}

// Close unmounts, forcibly if still mounted, and releases what the session
// opened, newest first.
func (s *Session) Close() {
	if s.mounted {
		if err := s.Unmount(true); err != nil {
			s.log.Warn().Err(err).Msg("unmount")
		}
	}
	for i := len(s.close) - 1; i >= 0; i-- {
		s.close[i]()
	}
	s.close = nil
}
