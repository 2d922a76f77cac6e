package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/fetch"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show a mount's progress until the overlay is complete or the mount goes away",
		ArgsUsage: "MOUNTPOINT",
		Description: `Reads MOUNTPOINT/stats every --interval and shows, in 80 columns: the segments
present, the fetch rate over the last few seconds, the bytes fetched, the stall (the
wall-clock time in which at least one read waited) and the wait total (every read's
wait, summed), and the segments whose fetches keep failing with the last reason.
It ends when every segment is present, or when the mount goes away. A mount with
--policy demand-only fetches only what reads ask for and is never complete: status
shows it once and says so. On a terminal the lines are redrawn in place.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "once", Usage: "print the current state once and exit"},
			&cli.DurationFlag{Name: "interval", Value: 500 * time.Millisecond, Usage: "refresh interval"},
		},
		Action: statusCmd,
	}
}

// statusWidth is the widest line status prints.
const statusWidth = 80

// rateWindow is how far back the rate status shows looks: long enough to
// smooth the steps of whole segments arriving, short enough to follow a
// link that changes.
const rateWindow = 5 * time.Second

func statusCmd(c *cli.Context) error {
	if err := need(c, 1, "one MOUNTPOINT"); err != nil {
		return err
	}
	mnt := c.Args().First()
	path := filepath.Join(mnt, "stats")
	w := c.App.Writer
	tty := newProgress(w) != nil
	var rate rateMeter
	shown := 0 // lines drawn last time, to redraw over on a terminal
	tick := time.NewTicker(c.Duration("interval"))
	defer tick.Stop()
	for seen := false; ; seen = true {
		s, err := readStats(path)
		if err != nil && seen && tty {
			fmt.Fprintln(w)
		}
		switch {
		case err != nil && seen && errors.Is(err, os.ErrNotExist):
			fmt.Fprintf(w, "%s is no longer mounted\n", mnt)
			return nil
		case err != nil && errors.Is(err, syscall.ENOTCONN):
			return fmt.Errorf("status: the daemon behind %s stopped without unmounting; 'cloudletfs umount %s' cleans it up", mnt, mnt)
		case err != nil:
			return fmt.Errorf("status: %w (is a cloudletfs overlay mounted on %s?)", err, mnt)
		}
		lines := statusLines(s, rate.add(time.Now(), s.BytesFetched))
		if tty {
			// Back to the first line drawn last time, then over it.
			if shown > 1 {
				fmt.Fprintf(w, "\r\033[%dA", shown-1)
			}
			for i, l := range lines {
				if i > 0 {
					fmt.Fprint(w, "\n")
				}
				fmt.Fprintf(w, "\r\033[K%s", l)
			}
			// Clear what is left of a longer block drawn before.
			fmt.Fprint(w, "\033[J")
			shown = len(lines)
		} else {
			for _, l := range lines {
				fmt.Fprintln(w, l)
			}
		}
		demandOnly := s.Policy == "demand-only"
		if s.Complete || c.Bool("once") || demandOnly {
			if tty {
				fmt.Fprintln(w)
			}
			if demandOnly && !s.Complete {
				fmt.Fprintln(w, "this mount fetches on demand only (--policy demand-only): it never completes")
			}
			return nil
		}
		select {
		case <-tick.C:
		case <-c.Context.Done():
			if tty {
				fmt.Fprintln(w)
			}
			return nil
		}
	}
}

// readStats reads and decodes a mount's stats file.
func readStats(path string) (*fetch.Stats, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s fetch.Stats
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &s, nil
}

// rateMeter is the fetch rate over the last rateWindow, from samples of
// the bytes fetched so far.
type rateMeter struct {
	samples []rateSample
}

type rateSample struct {
	at    time.Time
	bytes int64
}

// add records a sample and returns the rate since the oldest sample in
// the window, or -1 before there are two.
func (m *rateMeter) add(at time.Time, bytes int64) float64 {
	m.samples = append(m.samples, rateSample{at, bytes})
	// Keep one sample at or before the window's start, so the rate always
	// spans the whole window once there is one.
	for len(m.samples) > 2 && at.Sub(m.samples[1].at) >= rateWindow {
		m.samples = m.samples[1:]
	}
	first := m.samples[0]
	dt := at.Sub(first.at).Seconds()
	if len(m.samples) < 2 || dt <= 0 {
		return -1
	}
	return float64(bytes-first.bytes) / dt
}

// statusLines renders stats in lines of at most statusWidth columns: the
// progress, then the fetching and waiting, then one line per failing
// segment, at most three and a count of the rest.
func statusLines(s *fetch.Stats, rate float64) []string {
	share := 1.0
	if s.Segments > 0 {
		share = float64(s.SegmentsPresent) / float64(s.Segments)
	}
	const barWidth = 24
	n := int(share * barWidth)
	bar := "[" + strings.Repeat("#", n) + strings.Repeat("-", barWidth-n) + "]"
	rateText := "rate -"
	if rate >= 0 {
		rateText = humanize.IBytes(uint64(rate)) + "/s"
	}
	lines := []string{
		fmt.Sprintf("%s %5.1f%%  %d/%d segments  %s", bar, 100*share, s.SegmentsPresent, s.Segments, rateText),
		fmt.Sprintf("fetched %s, %d on demand; stall %s, wait total %s (p99 %s)",
			humanize.IBytes(uint64(s.BytesFetched)), s.DemandFetches, ms(s.StallMs), ms(s.WaitTotalMs), ms(s.WaitP99Ms)),
	}
	if s.FetchErrors > 0 || s.Timeouts > 0 || s.CorruptSegments > 0 {
		lines = append(lines, fmt.Sprintf("errors %d, timeouts %d, corrupt %d", s.FetchErrors, s.Timeouts, s.CorruptSegments))
	}
	const maxFailing = 3
	for i, f := range s.FailingSegments {
		if i == maxFailing {
			lines = append(lines, fmt.Sprintf("and %d more failing segments", len(s.FailingSegments)-maxFailing))
			break
		}
		retry := fmt.Sprintf("retry in %.0f s", f.RetryInS)
		if f.RetryInS < 0 {
			retry = "given up until remount"
		}
		lines = append(lines, fmt.Sprintf("failing segment %d: %d failures, %s: %s",
			f.Segment, f.Failures, retry, oneLine(f.LastError)))
	}
	for i, l := range lines {
		lines[i] = clipWidth(l, statusWidth)
	}
	return lines
}

// ms shows a duration given in milliseconds.
func ms(v float64) string {
	if v < 1000 {
		return fmt.Sprintf("%.0f ms", v)
	}
	return fmt.Sprintf("%.1f s", v/1000)
}

// oneLine folds an error that spans lines into one.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// clipWidth cuts s to at most width characters, marking the cut.
func clipWidth(s string, width int) string {
	if utf8.RuneCountInString(s) <= width {
		return s
	}
	r := []rune(s)
	return string(r[:width-1]) + "…"
}
