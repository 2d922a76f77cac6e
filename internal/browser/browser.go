// Package browser lets a test look at a page as a person does: it drives a
// headless Chromium (Debian's, at /usr/bin/chromium) through the DevTools
// protocol, reads the visible text of elements and takes screenshots. Each
// Browser is one Chromium process with a fresh profile in the test's temp
// dir, stopped when the test ends. It is for tests only.
package browser

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// ExecPath is the Chromium the harness starts.
const ExecPath = "/usr/bin/chromium"

// Bounds on the steps that take no timeout of their own.
const (
	startTimeout = 60 * time.Second // Chromium starting and opening its tab
	stepTimeout  = 30 * time.Second // one Open, Text or Screenshot
)

// Browser is a headless Chromium with one tab.
type Browser struct {
	tab context.Context
	out *output
}

// New starts Chromium for t and stops it in t's cleanup. It fails t if
// Chromium is missing or does not start.
func New(t testing.TB) *Browser {
	t.Helper()
	if _, err := os.Stat(ExecPath); err != nil {
		t.Fatalf("browser: %s: %v: install it: make deps", ExecPath, err)
	}
	// The profile dir is made before the cleanup below is registered, so
	// it is removed after Chromium has exited.
	profile := t.TempDir()
	out := &output{}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(ExecPath),
		chromedp.Headless,
		chromedp.NoSandbox, // tests run as root, where the sandbox refuses to start
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		// Chromium's own connections (updates, sync, field trials, QUIC
		// probes) are refused on a closed network and slow every start.
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(profile),
		chromedp.CombinedOutput(out),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	log := &logger{t: t}
	tab, cancelTab := chromedp.NewContext(actx, chromedp.WithErrorf(log.logf))
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // waits for Chromium to exit
		log.stop()
	})
	// The first run starts Chromium and lives as long as its context, so
	// it takes no deadline of its own: a timer cancels a start that hangs.
	hung := time.AfterFunc(startTimeout, cancelTab)
	err := chromedp.Do(tab, chromedp.Navigate("about:blank"))
	if !hung.Stop() {
		err = fmt.Errorf("no tab after %v (%v)", startTimeout, err)
	}
	if err != nil {
		t.Fatalf("browser: starting %s: %v\nits output:\n%s", ExecPath, err, out)
	}
	return &Browser{tab: tab, out: out}
}

// Open loads url in the tab and waits until it has loaded.
func (b *Browser) Open(t testing.TB, url string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.tab, stepTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Navigate(url)); err != nil {
		t.Fatalf("browser: opening %s: %v", url, err)
	}
}

// Text returns the visible text of the first element that the CSS
// selector matches, waiting for one to be there.
func (b *Browser) Text(t testing.TB, selector string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.tab, stepTimeout)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(selector)))
	if err != nil {
		t.Fatalf("browser: text of %s: %v", selector, err)
	}
	return s
}

// textJS returns the visible text of the element that args[0] selects once
// it holds args[1], and false until then.
const textJS = `(sel, want) => {
	const el = document.querySelector(sel);
	return el !== null && el.innerText.includes(want) ? el.innerText : false;
}`

// WaitText waits until the visible text of the first element that the CSS
// selector matches holds substring, and returns that text. The page may
// change under it or load itself again (a refreshing status page does):
// the wait is taken up again in each new document. It fails t with the
// last text seen once timeout has passed.
func (b *Browser) WaitText(t testing.TB, selector, substring string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	ctx, cancel := context.WithDeadline(b.tab, deadline)
	defer cancel()
	var err error
	for ctx.Err() == nil {
		// The predicate runs at once and on every change to the DOM. A
		// new document ends it with an error: its context is gone.
		var s string
		s, err = chromedp.Run(ctx, chromedp.PollFunction[string](textJS,
			chromedp.WithPollingMutation(),
			chromedp.WithPollingTimeout(time.Until(deadline)),
			chromedp.WithPollingArgs(selector, substring)))
		if err == nil {
			return s
		}
		if errors.Is(err, chromedp.ErrPollingTimeout) {
			break
		}
		// Wait for the next document to have a body before polling it.
		chromedp.Do(ctx, chromedp.WaitReady(chromedp.CSS("body")))
	}
	t.Fatalf("browser: %s did not show %q within %v (%v); the last text seen:\n%s", selector, substring, timeout, err, b.lastText(selector))
	return ""
}

// lastText is the element's visible text now, or what kept it from being
// read.
func (b *Browser) lastText(selector string) string {
	ctx, cancel := context.WithTimeout(b.tab, 5*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](
		fmt.Sprintf(`(document.querySelector(%q) || {innerText: "(no element matches)"}).innerText`, selector)))
	if err != nil {
		return fmt.Sprintf("(could not read it: %v)", err)
	}
	return s
}

// Screenshot writes a PNG of the whole page to path.
func (b *Browser) Screenshot(t testing.TB, path string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.tab, stepTimeout)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("browser: screenshot: %v", err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatalf("browser: screenshot: %v", err)
	}
}

// output keeps Chromium's stdout and stderr, for the message when it
// fails to start.
type output struct {
	mu sync.Mutex
	b  strings.Builder
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.b.Len() < 64<<10 {
		o.b.Write(p)
	}
	return len(p), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// logger sends chromedp's errors to the test's log until the test's
// cleanup, after which a test's log may no longer be written.
type logger struct {
	mu      sync.Mutex
	t       testing.TB
	stopped bool
}

func (l *logger) logf(format string, a ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.stopped {
		l.t.Logf("browser: "+format, a...)
	}
}

func (l *logger) stop() {
	l.mu.Lock()
	l.stopped = true
	l.mu.Unlock()
}
