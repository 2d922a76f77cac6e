package main

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

var cacheSizeFlag = &cli.StringFlag{Name: "cache-size", Value: "20GiB",
	Usage: "cap on the chunk cache: when a mount starts and when it ends, least recently used overlays' caches are removed to stay under it (mounted ones never, nor data written through mounts)"}

// parseCacheSize reads --cache-size; a command without the flag has no cap.
func parseCacheSize(c *cli.Context) (int64, error) {
	if c.String("cache-size") == "" {
		return math.MaxInt64, nil
	}
	n, err := humanize.ParseBytes(c.String("cache-size"))
	if err != nil {
		return 0, badFlag("--cache-size %q: want a size such as 20GiB", c.String("cache-size"))
	}
	return int64(n), nil
}

func cacheCommand() *cli.Command {
	return &cli.Command{
		Name:  "cache",
		Usage: "manage the chunk cache of fetched overlays",
		Description: `Every overlay that was mounted keeps its verified chunks in the state dir, so a
later mount fetches nothing again. Data written through a mount is not part of the
cache and is never removed by these commands.`,
		Subcommands: []*cli.Command{
			{
				Name:   "ls",
				Usage:  "list cached overlays, least recently used first",
				Action: cacheLs,
			},
			{
				Name:   "gc",
				Usage:  "remove least recently used caches until the cache fits --cache-size",
				Flags:  []cli.Flag{cacheSizeFlag},
				Action: cacheGC,
			},
			{
				Name:      "verify",
				Usage:     "re-read cached chunks and check them against the digests recorded when they were cached",
				ArgsUsage: "[OVERLAY-ID...]",
				Description: `Checks every cached segment of the named overlays (all unmounted ones by default).
A segment whose chunks no longer match is forgotten, so the next mount fetches it again.
Exits non-zero if any segment was bad.`,
				Action: cacheVerify,
			},
			{
				Name:      "rm",
				Usage:     "remove the cache of one overlay",
				ArgsUsage: "OVERLAY-ID",
				Action:    cacheRm,
			},
		},
	}
}

func cacheLs(c *cli.Context) error {
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	ents, err := st.Caches()
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OVERLAY\tSIZE\tLAST USED\tMOUNTED")
	var total int64
	for _, e := range ents {
		total += e.Bytes
		mounted := "no"
		if e.Mounted {
			mounted = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.ID, humanize.IBytes(uint64(e.Bytes)), e.LastUsed.Local().Format(time.DateTime), mounted)
	}
	fmt.Fprintf(tw, "total\t%s\t\t\n", humanize.IBytes(uint64(total)))
	return tw.Flush()
}

func cacheGC(c *cli.Context) error {
	limit, err := parseCacheSize(c)
	if err != nil {
		return err
	}
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	freed, err := st.GC(limit)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "freed %s\n", humanize.IBytes(uint64(freed)))
	return nil
}

func cacheRm(c *cli.Context) error {
	if err := need(c, 1, "one OVERLAY-ID (see `cloudletfs cache ls`)"); err != nil {
		return err
	}
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	id, err := findCache(st, c.Args().First())
	if err != nil {
		return err
	}
	if err := st.RemoveCache(id); errors.Is(err, store.ErrInUse) {
		return fmt.Errorf("overlay %s is mounted: unmount it first", id)
	} else if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "removed the cache of overlay %s\n", id)
	return nil
}

func cacheVerify(c *cli.Context) error {
	st, err := openStore(c)
	if err != nil {
		return err
	}
	defer st.Close()
	var ids []overlay.Digest
	named := c.NArg() > 0
	for _, ref := range c.Args().Slice() {
		id, err := findCache(st, ref)
		if err != nil {
			return err
		}
		ids = append(ids, id)
	}
	if !named {
		ents, err := st.Caches()
		if err != nil {
			return err
		}
		for _, e := range ents {
			ids = append(ids, e.ID)
		}
	}
	// Verifying re-reads whole caches; mounts must not wait on the
	// registry meanwhile. Each overlay is held by its own lock.
	if err := st.Close(); err != nil {
		return err
	}
	var total, failed int
	for _, id := range ids {
		// One cache is checked whole; a stop ends the run between caches.
		if err := c.Context.Err(); err != nil {
			return err
		}
		checked, bad, err := st.VerifyCache(id)
		if errors.Is(err, store.ErrInUse) && !named {
			fmt.Fprintf(c.App.Writer, "%s: mounted, skipped\n", id)
			continue
		}
		if errors.Is(err, store.ErrInUse) {
			return fmt.Errorf("overlay %s is mounted: unmount it first", id)
		}
		if err != nil {
			return fmt.Errorf("overlay %s: %w", id, err)
		}
		total += checked
		failed += len(bad)
		if len(bad) > 0 {
			fmt.Fprintf(c.App.Writer, "%s: %d segments checked, %d bad and forgotten: %v\n", id, checked, len(bad), bad)
		} else {
			fmt.Fprintf(c.App.Writer, "%s: %d segments checked, all good\n", id, checked)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d cached segments did not match their digests; they will be fetched again", failed, total)
	}
	fmt.Fprintf(c.App.Writer, "verified %d cached segments\n", total)
	return nil
}

// findCache resolves an overlay ID or an unambiguous prefix of one.
func findCache(st *store.Store, ref string) (overlay.Digest, error) {
	ents, err := st.Caches()
	if err != nil {
		return overlay.Digest{}, err
	}
	var found []overlay.Digest
	for _, e := range ents {
		if strings.HasPrefix(e.ID.String(), strings.ToLower(ref)) && ref != "" {
			found = append(found, e.ID)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return overlay.Digest{}, fmt.Errorf("no cached overlay %q (see `cloudletfs cache ls`)", ref)
	}
	return overlay.Digest{}, fmt.Errorf("overlay %q is ambiguous: %d cached overlays start with it", ref, len(found))
}
