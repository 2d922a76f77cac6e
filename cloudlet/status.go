package cloudlet

import (
	"fmt"
	"html/template"
	"net/http"
	"time"

	"github.com/dustin/go-humanize"
)

// The status page is rendered on the server and refreshes itself with a
// meta tag: it needs no script and no build step.
var statusTemplate = template.Must(template.New("status").Funcs(template.FuncMap{
	"bytes":   func(n int64) string { return humanize.IBytes(uint64(max(0, n))) },
	"seconds": func(s float64) string { return fmt.Sprintf("%.1f s", s) },
	"percent": func(p *Progress) string {
		if p == nil || p.Segments == 0 {
			return "—"
		}
		return fmt.Sprintf("%d%%", p.SegmentsPresent*100/p.Segments)
	},
	"ratio": func(p *Progress) int {
		if p == nil || p.Segments == 0 {
			return 0
		}
		return p.SegmentsPresent * 100 / p.Segments
	},
	"time": func(t time.Time) string { return t.Local().Format(time.DateTime) },
}).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{{.Refresh}}">
<title>cloudlet · {{len .VMs}} VMs</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { text-align: left; padding: .3em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }
.state { font-weight: bold; }
.failed { color: #b00; } .complete, .first-response { color: #070; } .stopped { color: #666; }
progress { width: 8em; }
ol { margin: 0; padding-left: 1.2em; font-size: 13px; }
</style>
</head>
<body>
<h1>Cloudlet</h1>
<p id="summary">{{len .VMs}} VMs, {{.Live}} running or starting, {{bytes .Memory}} of guest RAM in use{{if .MaxMemory}} of {{bytes .MaxMemory}}{{end}}. Updated {{time .Now}}.</p>
<h2>VMs</h2>
{{if .VMs}}
<table id="vms">
<tr><th>VM</th><th>State</th><th>Overlay</th><th>Reached at</th><th>Ports</th><th>Overlay progress</th><th>Timeline</th></tr>
{{range .VMs}}
<tr class="vm" id="vm-{{.ID}}">
<td>{{.ID}}<br><small>base {{.Base}}</small></td>
<td class="state {{.State}}">{{.State}}{{if .Reason}}<br><small>{{.Reason}}</small>{{end}}</td>
<td>{{.Overlay}}</td>
<td>{{with $.At . "running"}}running {{seconds .}}<br>{{end}}{{with $.At . "first-response"}}first response {{seconds .}}<br>{{end}}{{with $.At . "complete"}}complete {{seconds .}}{{end}}</td>
<td>{{range .Ports}}{{.Guest}} → {{.Host}}<br>{{end}}</td>
<td>{{with .Progress}}<progress max="100" value="{{ratio .}}"></progress> {{percent .}}<br><small>{{.SegmentsPresent}}/{{.Segments}} segments, {{bytes .BytesFetched}} fetched of {{bytes .OverlayBytes}}</small>{{else}}—{{end}}</td>
<td><ol>{{range .Timeline}}<li>{{seconds .At}} {{.Text}}</li>{{end}}</ol></td>
</tr>
{{end}}
</table>
{{else}}
<p id="no-vms">No VMs yet. Ask for one with <code>cloudletfs synthesize --cloudlet URL OVERLAY-URL</code>.</p>
{{end}}
<h2>Bases</h2>
{{if .BasesErr}}<p class="failed">Could not list the bases: {{.BasesErr}}</p>{{end}}
<table id="bases">
<tr><th>Name</th><th>ID</th><th>Disk</th><th>Memory</th><th>Runnable</th></tr>
{{range .Bases}}<tr><td>{{.Name}}</td><td><code>{{.ID}}</code></td><td>{{bytes .DiskBytes}}</td><td>{{bytes .MemoryBytes}}</td><td>{{if .Runnable}}yes{{else}}no: no vm.json{{end}}</td></tr>
{{end}}
</table>
</body>
</html>
`))

type statusData struct {
	VMs       []VM
	Bases     []Base
	BasesErr  string
	Live      int
	Memory    int64
	MaxMemory int64
	Now       time.Time
	Refresh   int
}

// At returns where a VM's timeline reached step, or nil.
func (statusData) At(v VM, step string) any {
	if at, ok := v.At(step); ok {
		return at
	}
	return nil
}

func (s *Service) statusPage(w http.ResponseWriter, r *http.Request) {
	d := statusData{VMs: s.List(), MaxMemory: s.opt.MaxMemory, Now: time.Now(), Refresh: 2}
	for _, v := range d.VMs {
		if !v.State.Final() {
			d.Live++
			d.Memory += v.MemoryBytes
		}
	}
	bs, err := s.Bases()
	if err != nil {
		d.BasesErr = err.Error()
	}
	d.Bases = bs
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := statusTemplate.Execute(w, d); err != nil {
		s.log.Warn().Err(err).Msg("rendering the status page")
	}
}
