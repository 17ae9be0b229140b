"""The dashboard's page (observe/dashboard.py): one HTML file with its own script; SVG charts, no library.

It polls /api/metrics and /api/run every 2 s and redraws: the header (run directory's latest step, loss,
tokens/s, MFU, goodput), line charts (loss and eval loss, tokens/s, memory, gradient norm), the per-layer
gradient-norm heat map, the goodput ledger, the anomaly table and the run config.
"""

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>picotron-jax dashboard</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 8px} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px} .card h2{font-size:14px;margin:0 0 4px}
table{border-collapse:collapse;font-size:12px} td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}
pre{font-size:11px;max-height:300px;overflow:auto} .bad{color:#c00}
</style></head><body>
<h1>picotron-jax <span id="status">loading...</span></h1>
<div id="summary"></div>
<div class="grid">
<div class="card"><h2>loss</h2><svg id="loss" width="400" height="180"></svg></div>
<div class="card"><h2>tokens/s (MFU in the header)</h2><svg id="tps" width="400" height="180"></svg></div>
<div class="card"><h2>memory (GiB)</h2><svg id="mem" width="400" height="180"></svg></div>
<div class="card"><h2>gradient norm</h2><svg id="gnorm" width="400" height="180"></svg></div>
<div class="card"><h2>per-layer gradient norm (log10; rows: layers, columns: steps)</h2><svg id="layers" width="400" height="180"></svg></div>
<div class="card"><h2>goodput</h2><table id="goodput"></table></div>
<div class="card"><h2>anomalies</h2><table id="alerts"></table></div>
<div class="card"><h2>config</h2><pre id="config"></pre></div>
</div>
<script>
const NS="http://www.w3.org/2000/svg";
function el(tag,attrs,parent){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);if(parent)parent.appendChild(e);return e}
function fin(v){return typeof v==="number"&&isFinite(v)}
function chart(id,series,marks){
  const svg=document.getElementById(id);svg.innerHTML="";const W=400,H=180,L=50,B=20;
  const pts=series.flatMap(s=>s.points);if(!pts.length){el("text",{x:L,y:H/2},svg).textContent="no data";return}
  const xs=pts.map(p=>p[0]),ys=pts.map(p=>p[1]);let x0=Math.min(...xs),x1=Math.max(...xs),y0=Math.min(...ys),y1=Math.max(...ys);
  if(x1===x0)x1=x0+1;if(y1===y0){y1=y0+1;y0=y0-1}
  const X=x=>L+(x-x0)/(x1-x0)*(W-L-8),Y=y=>H-B-(y-y0)/(y1-y0)*(H-B-8);
  el("line",{x1:L,y1:H-B,x2:W,y2:H-B,stroke:"#999"},svg);el("line",{x1:L,y1:0,x2:L,y2:H-B,stroke:"#999"},svg);
  [[y0,H-B],[y1,12]].forEach(([v,y])=>{el("text",{x:2,y:y,"font-size":10},svg).textContent=v.toPrecision(4)});
  [[x0,L],[x1,W-30]].forEach(([v,x])=>{el("text",{x:x,y:H-4,"font-size":10},svg).textContent=v});
  (marks||[]).forEach(s=>{if(s>=x0&&s<=x1)el("line",{x1:X(s),x2:X(s),y1:0,y2:H-B,stroke:"red","stroke-opacity":0.5},svg)});
  series.forEach(s=>{if(!s.points.length)return;el("polyline",{points:s.points.map(p=>X(p[0])+","+Y(p[1])).join(" "),fill:"none",stroke:s.color,"stroke-width":1.5},svg)});
}
function heat(rows){
  const svg=document.getElementById("layers");svg.innerHTML="";const lr=rows.filter(r=>Array.isArray(r.layer_grad_norm)).slice(-60);
  if(!lr.length){el("text",{x:20,y:90},svg).textContent="no per-layer rows yet (monitor.layer_every)";return}
  const Lc=lr[0].layer_grad_norm.length,vals=lr.flatMap(r=>r.layer_grad_norm.filter(fin).map(v=>Math.log10(Math.max(v,1e-12))));
  const lo=Math.min(...vals),hi=Math.max(...vals),w=400/lr.length,h=180/Lc;
  lr.forEach((r,i)=>r.layer_grad_norm.forEach((v,l)=>{const t=fin(v)?(Math.log10(Math.max(v,1e-12))-lo)/((hi-lo)||1):1;
    el("rect",{x:i*w,y:180-(l+1)*h,width:w+0.5,height:h+0.5,fill:fin(v)?`hsl(${240-240*t},70%,50%)`:"#000"},svg)
    .appendChild(document.createElementNS(NS,"title")).textContent=`step ${r.step} layer ${l}: ${v}`}));
}
function table(id,head,rows){document.getElementById(id).innerHTML="<tr>"+head.map(h=>`<th>${h}</th>`).join("")+"</tr>"+
  rows.map(r=>"<tr>"+r.map(c=>`<td>${String(c).replace(/</g,"&lt;")}</td>`).join("")+"</tr>").join("")}
// a rewind or rerun writes its redone steps again: the newest row of each step counts, in step order
function latest(rs){const m=new Map();rs.forEach(r=>m.set(r.step,r));return [...m.values()].sort((a,b)=>a.step-b.step)}
async function update(){
  try{
    const rows=await (await fetch("/api/metrics",{cache:"no-store"})).json();const info=await (await fetch("/api/run",{cache:"no-store"})).json();
    const train=latest(rows.filter(r=>r.kind==="train")),evals=latest(rows.filter(r=>r.kind==="eval")),last=train[train.length-1];
    const marks=info.alerts.map(a=>a.step);const ser=(rs,k,f)=>rs.filter(r=>fin(r[k])).map(r=>[r.step,f?f(r[k]):r[k]]);
    document.getElementById("status").textContent=last?`step ${last.step}`:"no rows yet";
    document.getElementById("summary").textContent=last?`loss ${last.loss.toFixed(4)} | ${fin(last.tokens_per_s)?Math.round(last.tokens_per_s):"n/a"} tokens/s | MFU ${fin(last.mfu)?(100*last.mfu).toFixed(1)+"%":"n/a"} | goodput ${fin(last.goodput)?(100*last.goodput).toFixed(1)+"%":"n/a"} | ${info.alerts.length} anomalies`:"";
    chart("loss",[{points:ser(train,"loss"),color:"#1f77b4"},{points:ser(evals,"eval_loss"),color:"#ff7f0e"}],marks);
    chart("tps",[{points:ser(train,"tokens_per_s"),color:"#2ca02c"}],marks);
    chart("mem",[{points:ser(train,"memory_bytes",v=>v/2**30),color:"#9467bd"}],marks);
    chart("gnorm",[{points:ser(train,"grad_norm"),color:"#d62728"}],marks);
    heat(train);
    const g=info.goodput;table("goodput",["class","seconds"],g?[["goodput",(100*g.goodput).toFixed(1)+"%"],...Object.entries(g.ledger).map(([k,v])=>[k,v.toFixed(2)])]:[]);
    table("alerts",["step","kind","where","detail","threshold","action"],info.alerts.map(a=>[a.step,a.kind,a.where,a.detail,a.threshold,a.action]));
    document.getElementById("config").textContent=info.config;
  }catch(e){document.getElementById("status").textContent="cannot read the run: "+e}
}
update();setInterval(update,2000);
</script></body></html>
"""
