package qemu

import (
	"context"
	"fmt"
	"regexp"
	"time"
)

// What a capture types into a guest's shell to close the semantic gap. Each
// line ends in a marker split in two by quotes, so that the echo of the
// typed line never matches it. They need only a POSIX shell and fstrim,
// which busybox and util-linux both have.
//
// trimCommand syncs first, since ext4 trims only blocks whose freeing is
// committed, then runs fstrim on every file system that can take it. Before
// that it lowers free page reporting's order to 0: Linux reports only free
// blocks of its pageblock order (2 MiB) and up by default, and what a guest
// freed lies in smaller pieces too. In the seed's experiment on the test
// guest (docs/BENCHMARKS.md) the overlay grew by 1.95 MB at order 9, by
// 2.0 MB with memory compacted first, and by 0.30 MB at order 0.
// Reporting runs only once a page freed reaches the buddy allocator with
// at least that order, which an idle guest may not do for a long time: a
// dd that allocates and frees 8 MiB at the end makes sure it happens.
// Every page freed is then reported, so the old order is put back before
// the VM is saved (restoreCommand): a launched guest would otherwise report
// each page it frees, one punch at a time.
const (
	reportingOrder = "/sys/module/page_reporting/parameters/page_reporting_order"
	trimCommand    = `cloudletfs_pro=$(cat ` + reportingOrder + ` 2>/dev/null); { echo 0 >` + reportingOrder + `; } 2>/dev/null; ` +
		`sync; while read -r d m t o; do case $t in ext2|ext3|ext4|xfs|btrfs) fstrim "$m";; esac; done </proc/mounts; ` +
		`dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null; echo cloudletfs-""trimmed` + "\n"
	restoreCommand = `[ -n "$cloudletfs_pro" ] && { echo "$cloudletfs_pro" >` + reportingOrder + `; } 2>/dev/null; ` +
		`unset cloudletfs_pro; echo cloudletfs-""restored` + "\n"
)

var (
	trimmed  = regexp.MustCompile(`^cloudletfs-trimmed$`)
	restored = regexp.MustCompile(`^cloudletfs-restored$`)
)

// Trim types the trim command into the guest's console, which must have a
// shell waiting at its prompt, and waits up to timeout for the guest to
// say it is done. The guest's discards of disk blocks have reached QEMU
// by then; the free pages it reports come later (see Settle). Call
// RestoreReporting before the VM is saved.
func (v *VM) Trim(ctx context.Context, timeout time.Duration) error {
	return v.run(ctx, trimCommand, trimmed, timeout, "trim its file systems")
}

// RestoreReporting puts back the free page reporting order Trim lowered.
func (v *VM) RestoreReporting(ctx context.Context, timeout time.Duration) error {
	return v.run(ctx, restoreCommand, restored, timeout, "restore its free page reporting order")
}

// run types cmd and waits until a console line matches done.
func (v *VM) run(ctx context.Context, cmd string, done *regexp.Regexp, timeout time.Duration, what string) error {
	v.ClearConsole()
	if err := v.Type(cmd); err != nil {
		return fmt.Errorf("typing into the guest's console: %w", err)
	}
	if err := v.WaitConsole(ctx, done, timeout); err != nil {
		return fmt.Errorf("the guest did not %s: %w\n"+
			"a shell must wait at the console's prompt once the customization is done (start services in the background)", what, err)
	}
	return nil
}

// Settled says how a wait for discards to settle ended.
type Settled struct {
	Waited time.Duration // from the start of the wait to its end
	Quiet  bool          // the count stood (nearly) still for the whole quiet period
}

// Settle waits until count has moved by no more than slack for quiet, or
// until limit has passed, whichever is first; it polls every poll. Linux
// reports freed pages 2 s after they were freed and then goes on until
// none are left, so quiet must be longer than that. The slack lets a guest
// whose services free and reuse a few pages all the time settle too.
func Settle(ctx context.Context, count func() int, quiet time.Duration, slack int, limit, poll time.Duration) (Settled, error) {
	start := time.Now()
	since, from := start, count()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return Settled{Waited: time.Since(start)}, ctx.Err()
		case <-tick.C:
			n := count()
			now := time.Now()
			if n-from > slack || from-n > slack {
				since, from = now, n
			}
			switch {
			case now.Sub(since) >= quiet:
				return Settled{Waited: now.Sub(start), Quiet: true}, nil
			case now.Sub(start) >= limit:
				return Settled{Waited: now.Sub(start)}, nil
			}
		}
	}
}
